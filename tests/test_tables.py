"""Gather lookup tables stored as int8 codes: structure, codes, numerics, and what stays float."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxptq
from conftest import fvi, make_model
from onnxptq.runtime import session

V, D = 300, 16


def embedding_model(rng: np.random.Generator, tied: bool = False) -> onnx.ModelProto:
    """ids → Gather(table) → MatMul(w) → y; with ``tied``, a second Gather reads the same table."""
    inits = {"table": (rng.standard_normal((V, D)) * rng.uniform(0.1, 2, D)).astype(np.float32),
             "w": (rng.standard_normal((D, 8)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    outputs = [fvi("y", ["N", 4, 8])]
    if tied:
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["e2"], name="lookup2"))
        outputs.append(fvi("e2", ["N", 4, D]))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    return make_model(nodes, [ids], outputs, inits)


def compile_ids(model, rng, tmp_path, **options):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=rng.integers(0, V, (40, 4)).astype(np.int64))
    out = tmp_path / "q.onnx"
    result = onnxptq.compile(path, calib, out, pipeline="calibration", weight_method="minmax", **options)
    return path, out, result


def test_table_is_gathered_as_codes_and_dequantized_per_column(rng, tmp_path):
    path, out, result = compile_ids(embedding_model(rng), rng, tmp_path)
    table = numpy_helper.to_array(onnx.load(path).graph.initializer[0])
    q = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    gather = next(n for n in q.graph.node if n.op_type == "Gather")
    codes, scale = inits[gather.input[0]], inits["table_scale"]
    assert codes.dtype == np.int8 and codes.shape == (V, D) and "table" not in inits
    np.testing.assert_allclose(scale, np.abs(table).max(0) / 127, rtol=1e-6)
    np.testing.assert_array_equal(codes, np.rint(table / scale).astype(np.int8))
    dq = next(n for n in q.graph.node if gather.output[0] in n.input)
    assert dq.op_type == "DequantizeLinear" and helper.get_attribute_value(dq.attribute[0]) == -1
    # the lookup of codes, dequantized, is exactly T̂ = q·s at the looked-up rows
    ids = rng.integers(0, V, (3, 4)).astype(np.int64)
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    got = session(probe).run([dq.output[0]], {"ids": ids})[0]
    np.testing.assert_array_equal(got, (codes.astype(np.float32) * scale)[ids])
    assert result.report["verification"]["coverage"] == 1.0
    assert out.stat().st_size < 0.4 * path.stat().st_size


def test_shared_and_excluded_tables_stay_float(rng, tmp_path):
    _, out, _ = compile_ids(embedding_model(rng, tied=True), rng, tmp_path)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    assert inits["table"].dtype == np.float32, "a table another node reads keeps its float values"
    _, out, result = compile_ids(embedding_model(rng), rng, tmp_path, exclude="Gather")
    assert "table" in {i.name for i in onnx.load(out).graph.initializer}
    assert not any(p["name"] == "tables" and p.get("notes") for p in result.report["passes"])
