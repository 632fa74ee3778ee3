"""Float constants of float ops stored as float16 under the size target (onnxptq/half_floats.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxptq.half_floats import HALF_MIN, half_bytes, half_floats
from tests.conftest import fvi, make_model


def _norm_like(rng: np.random.Generator) -> onnx.ModelProto:
    """y = DQ(Q(((x·γ + β) + ε + mask) ⊙ short)) with γ, β [64], a scalar ε, a mask holding −1e5, a
    [16]-value vector tiled by Expand, and a Q/DQ pair whose scale is a [64] float32."""
    inits = {"gamma": rng.uniform(0.5, 1.5, 64).astype(np.float32), "beta": rng.standard_normal(64).astype(np.float32),
             "eps": np.float32(1e-6), "mask": np.where(np.arange(64) < 4, -1e5, 0).astype(np.float32),
             "short": rng.uniform(0.5, 1.5, 16).astype(np.float32), "reps": np.array([4], np.int64),
             "scale": rng.uniform(0.01, 0.02, 64).astype(np.float32), "zp": np.zeros(64, np.int8)}
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["a"]), helper.make_node("Add", ["a", "beta"], ["b"]),
             helper.make_node("Add", ["b", "eps"], ["c"]), helper.make_node("Add", ["c", "mask"], ["d"]),
             helper.make_node("Tile", ["short", "reps"], ["tiled"]), helper.make_node("Mul", ["d", "tiled"], ["e"]),
             helper.make_node("QuantizeLinear", ["e", "scale", "zp"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], axis=1)]
    return make_model(nodes, [fvi("x", [2, 64])], [fvi("y", [2, 64]), ], inits, opset=21)


def _stored(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def test_large_float_constants_of_float_ops_become_float16_behind_a_cast(rng):
    model = _norm_like(rng)
    before = onnx.ModelProto.FromString(model.SerializeToString())
    half_floats(model)
    onnx.checker.check_model(model, full_check=True)
    stored = _stored(model)
    assert stored["gamma_f16"] == stored["beta_f16"] == TensorProto.FLOAT16
    assert "gamma" not in stored and "beta" not in stored
    # a scalar and a [16] vector are too small to pay for a Cast, −1e5 is beyond float16, a Q/DQ scale
    # sets the DequantizeLinear's output type
    assert {stored[n] for n in ("eps", "short", "mask", "scale")} == {TensorProto.FLOAT}
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    assert set(casts) == {"gamma", "beta"} and all(c.attribute[0].i == TensorProto.FLOAT for c in casts.values())
    inits = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    halves = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("gamma", "beta"):  # round to nearest float16: within half a float16 step
        step = np.spacing(np.abs(inits[name]).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(halves[f"{name}_f16"].astype(np.float32) - inits[name]) <= step / 2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = ReferenceEvaluator(model).run(None, {"x": x})[0]
    ref = ReferenceEvaluator(before).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= inits["scale"].max() + 1e-6  # at most one code moves by one step


def test_onnxruntime_folds_the_casts_at_load(rng, tmp_path):
    model = _norm_like(rng)
    half_floats(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "opt.onnx")
    assert not [n for n in optimized.graph.node if n.op_type == "Cast"]


def test_an_initializer_that_is_also_an_input_is_left_float32(rng):
    """An input with a default (an initializer of the same name) may be fed: its type is the input's."""
    gamma = rng.standard_normal(64).astype(np.float32)
    model = make_model([helper.make_node("Mul", ["x", "gamma"], ["y"])], [fvi("x", [64]), fvi("gamma", [64])],
                       [fvi("y", [64])], {"gamma": gamma})
    before = model.SerializeToString()
    half_floats(model)
    assert model.SerializeToString() == before


def test_half_bytes_counts_the_threshold():
    assert half_bytes(HALF_MIN - 1) == 4 * (HALF_MIN - 1)
    assert half_bytes(HALF_MIN) == 2 * HALF_MIN
