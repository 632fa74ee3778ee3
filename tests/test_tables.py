"""Gather lookup tables stored as int8 (or, under a mixed-precision budget, int4 or int2) codes: structure,
codes, numerics, sensitivity, and what stays float."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxptq
from conftest import fvi, make_model
from onnxptq.errors import InputError
from onnxptq.metrics import mean_kl
from onnxptq.passes.sensitivity import SAMPLES
from onnxptq.passes.verification import optimized_kernels
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


def affine_grid(table: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Min-max asymmetric grid per column over all 2^bits codes: s = (hi − lo)/(2^bits − 1) with
    lo = min(T[:, d], 0), hi = max(T[:, d], 0), z = rint(−2^(bits−1) − lo/s)."""
    lo, hi = np.minimum(table.min(0), 0), np.maximum(table.max(0), 0)
    scale = ((hi - lo) / (2**bits - 1)).astype(np.float32)
    return scale, np.rint(-(2 ** (bits - 1)) - lo / scale).astype(np.int64)


def fake_table(table: np.ndarray, bits: int) -> np.ndarray:
    """T̂ on the min-max asymmetric grid of ``affine_grid``."""
    scale, zero = affine_grid(table, bits)
    q = np.clip(np.rint(table / scale) + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ((q - zero) * scale).astype(np.float32)


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
    codes, scale, zero = inits[gather.input[0]], inits["table_scale"], inits["table_zero_point"]
    assert codes.dtype == np.int8 and codes.shape == (V, D) and "table" not in inits
    want_scale, want_zero = affine_grid(table, 8)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    np.testing.assert_array_equal(zero, want_zero)
    np.testing.assert_array_equal(codes, np.clip(np.rint(table / scale) + zero, -128, 127).astype(np.int8))
    assert codes.min() == -128 and codes.max() == 127, "min-max: both ends of every column's range are codes"
    dq = next(n for n in q.graph.node if gather.output[0] in n.input)
    assert dq.op_type == "DequantizeLinear" and helper.get_attribute_value(dq.attribute[0]) == -1
    # the lookup of codes, dequantized, is exactly T̂ = q·s at the looked-up rows
    ids = rng.integers(0, V, (3, 4)).astype(np.int64)
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    got = session(probe).run([dq.output[0]], {"ids": ids})[0]
    np.testing.assert_array_equal(got, ((codes.astype(np.float32) - zero) * scale)[ids])
    assert result.report["verification"]["coverage"] == 1.0
    assert out.stat().st_size < 0.4 * path.stat().st_size


def test_shared_and_excluded_tables_stay_float(rng, tmp_path):
    _, out, _ = compile_ids(embedding_model(rng, tied=True), rng, tmp_path)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    assert inits["table"].dtype == np.float32, "a table another node reads keeps its float values"
    _, out, result = compile_ids(embedding_model(rng), rng, tmp_path, exclude="Gather")
    assert "table" in {i.name for i in onnx.load(out).graph.initializer}
    assert not any(p["name"] == "tables" and p.get("notes") for p in result.report["passes"])


@pytest.mark.parametrize("budget, bits, candidates", [(0.22, 4, "w8a8,w4a8,w3a8,w2a8"), (0.16, 2, "w8a8,w4a8,w3a8,w2a8"),
                                                     (0.25, 3, "w8a8,w3a8")])
def test_mixed_precision_keeps_tables_quantized_and_packs_them_when_the_budget_needs(rng, tmp_path, budget, bits,
                                                                                       candidates):
    """The program has a row for the table (8, 4, 3 or 2 bits, or float). Under 0.34× of fp32 it keeps
    it int8 (re-planning the layers once dropped every table, which wrote a float table over budget);
    under 0.22× only a 4-bit table fits, under 0.16× only a 2-bit one (the MatMul is not offered float,
    which would leave the program nothing else to give bytes up for); offered 8 and 3 bits, under 0.25×
    a 3-bit one (on this 20 kB model int3's 1 kB unpacking function makes a 3-bit table dearer than a
    4-bit one): packed int4 (int2) codes → Cast(int8), or int3 → Int3ToInt8, → Gather → DequantizeLinear,
    which onnxruntime runs with the unpacking folded away and looks up exactly (q − z)·s, q in [−8, 7]
    ([−4, 3], [−2, 1])."""
    model = embedding_model(rng)
    fp32_table = numpy_helper.to_array(model.graph.initializer[0])
    for size_ratio, width in ((0.34, 8), (budget, bits)):
        path, out, result = compile_ids(model, rng, tmp_path, size_ratio=size_ratio, target="ort-cpu-size",
                                        candidates=candidates, short_names=False)
        assert out.stat().st_size <= size_ratio * path.stat().st_size
        q = onnx.load(out)
        inits = {i.name: i for i in q.graph.initializer}
        assert "table" not in inits
        row = next(r for r in result.report["mixed"]["layers"] if r["op"] == "Gather")
        assert row["choice"] == f"int{width} table"
        codes = inits["table_quantized"]
        assert codes.data_type == {8: TensorProto.INT8, 4: TensorProto.INT4, 3: TensorProto.UINT8,
                                   2: TensorProto.INT2}[width]
    np.testing.assert_allclose(numpy_helper.to_array(inits["table_scale"]), affine_grid(fp32_table, bits)[0], rtol=1e-6)
    gather = next(n for n in q.graph.node if n.op_type == "Gather")
    unpack = next(n for n in q.graph.node if n.output[0] == gather.input[0])
    assert unpack.op_type == ("Int3ToInt8" if bits == 3 else "Cast") and unpack.input[0] == "table_quantized"
    assert not {"Cast", "Int3ToInt8", "BitShift", "BitwiseAnd"} & set(optimized_kernels(q).values()), \
        "onnxruntime folds the unpacking of the constant codes"
    dq = next(n for n in q.graph.node if gather.output[0] in n.input)
    ids = rng.integers(0, V, (3, 4)).astype(np.int64)
    q.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    got = session(q).run([dq.output[0]], {"ids": ids})[0]
    np.testing.assert_array_equal(got, fake_table(fp32_table, bits)[ids])
    # ΔL of each table width: the KL of the logits y = T[ids]·W with T replaced by T̂, on the probe's 16 samples
    probe_ids = np.load(tmp_path / "calib.npz")["ids"][:SAMPLES]
    w = numpy_helper.to_array(model.graph.initializer[1])
    for label, width in (("w8a8", 8), ("w4a8", 4), ("w3a8", 3), ("w2a8", 2)):
        if label not in candidates:
            continue
        if label == "w3a8" and "w4a8" in candidates:
            assert row["loss"][label] is None, "dearer than the 4-bit table here: dominated, not measured"
            continue
        table_hat = fake_table(fp32_table, width)
        want = mean_kl(fp32_table[probe_ids] @ w, table_hat[probe_ids] @ w, False)
        assert row["loss"][label] == pytest.approx(want, rel=1e-3)


def test_a_budget_that_leaves_every_layer_float_is_refused_with_the_way_out(rng, tmp_path):
    """At 0.34× of fp32 the int8 table leaves room for the one MatMul in float, which costs no loss:
    the program keeps it float, and a plan of a lookup alone is refused in one line naming both ways
    out; without float among the candidates the same budget compiles."""
    with pytest.raises(InputError, match="keeps every layer float.*smaller budget or leave float out"):
        compile_ids(embedding_model(rng), rng, tmp_path, size_ratio=0.34, target="ort-cpu-size")
    _, out, result = compile_ids(embedding_model(rng), rng, tmp_path, size_ratio=0.34, target="ort-cpu-size",
                                 candidates="w8a8,w4a8")
    assert {l["node"]: l["choice"] for l in result.report["mixed"]["layers"]} == {"proj": "w8a8",
                                                                                 "lookup": "int8 table"}


def test_uniform_contenders_store_the_table_at_their_weight_bits(rng, tmp_path):
    """Under a BOPs budget (a lookup costs none) the uniform models measured beside the program's mix
    store the table at the candidate's weight bits: uniform w8a4 as int8 (the 4-bit input is the
    MatMul's), uniform w4a8 as int4; neither is left out for the table."""
    _, _, result = compile_ids(embedding_model(rng), rng, tmp_path, bops_ratio=0.04, candidates="w8a8,w8a4,w4a8")
    mixed = result.report["mixed"]
    choices = {l["node"]: l["choice"] for l in mixed["layers"]}
    assert choices == {"proj": "w4a8", "lookup": "int8 table"}, "the table costs no BOPs: kept at 8 bits"
    assert {c["choice"] for c in mixed["contenders"]} == {"program", "uniform w8a4", "uniform w4a8"}
