import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import cnn, fvi, make_model
from onnxptq.model_io import to_ir
from onnxptq.passes.fusion import FusionPass
from onnxptq.runtime import session
from onnxptq.state import CompileOptions, CompileState
import onnx_ir as ir


def fuse(model: onnx.ModelProto) -> CompileState:
    state = CompileState(source=model, model=to_ir(model), options=CompileOptions(), calib=None, holdout=None)
    FusionPass().run(state)
    return state


def outputs(model, feed):
    return session(model, level="disable").run(None, feed)


def bn_model(rng, op, **attrs):
    """op → BatchNormalization, with layouts per op type."""
    c = 6
    bn = {"g": rng.uniform(0.5, 2, c).astype(np.float32), "be": rng.standard_normal(c).astype(np.float32),
          "mu": rng.standard_normal(c).astype(np.float32), "var": rng.uniform(0.2, 2, c).astype(np.float32)}
    if op == "Conv":
        w, x_shape = rng.standard_normal((c, 2, 3, 3)), ["N", 4, 8, 8]
        attrs.setdefault("group", 2)
    elif op == "ConvTranspose":
        w, x_shape = rng.standard_normal((4, 3, 3, 3)), ["N", 4, 8, 8]
        attrs.setdefault("group", 2)
    else:
        w = rng.standard_normal((c, 5) if attrs.get("transB") else (5, c))
        x_shape = ["N", 5]
    inits = {"w": w.astype(np.float32), "b": rng.standard_normal(c).astype(np.float32), **bn}
    nodes = [helper.make_node(op, ["x", "w", "b"], ["h"], name="layer", **attrs),
             helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["y"], name="bn", epsilon=1e-3)]
    y_shape = ["N", c] if op == "Gemm" else ["N", c, "H", "W"]
    return make_model(nodes, [fvi("x", x_shape)], [fvi("y", y_shape)], inits), x_shape


@pytest.mark.parametrize("op,attrs", [("Conv", {}), ("ConvTranspose", {}), ("Gemm", {"transB": 1}), ("Gemm", {})])
def test_batchnorm_folds_exactly(rng, op, attrs):
    model, x_shape = bn_model(rng, op, **attrs)
    feed = {"x": rng.standard_normal([3] + x_shape[1:]).astype(np.float32)}
    state = fuse(model)
    fused = ir.serde.serialize_model(state.model)
    assert [n.op_type for n in fused.graph.node] == [op]
    assert [o.name for o in fused.graph.output] == ["y"]
    np.testing.assert_allclose(outputs(fused, feed)[0], outputs(model, feed)[0], rtol=1e-4, atol=1e-4)
    folded = state.plan.folded_bn["layer"]
    assert folded.epsilon == pytest.approx(1e-3)
    np.testing.assert_array_equal(folded.gamma, onnx.numpy_helper.to_array(model.graph.initializer[2]))


def test_batchnorm_with_shared_producer_stays(rng):
    model, _ = bn_model(rng, "Conv")
    model.graph.output.append(fvi("h", ["N", 6, "H", "W"]))  # the conv output is also a graph output: cannot fold
    state = fuse(model)
    assert [n.op_type for n in state.model.graph] == ["Conv", "BatchNormalization"]
    assert not state.plan.folded_bn


def test_constants_lifted_and_bounds_noted(rng):
    model = cnn(rng, bn=True)
    # store conv1's weight as a Constant node, as PP-OCR models do
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    model.graph.initializer.remove(w1)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w1"], value=w1))
    state = fuse(model)
    ops = [n.op_type for n in state.model.graph]
    assert "Constant" not in ops and "BatchNormalization" not in ops
    assert state.plan.bounds["r1"] == (0.0, np.inf) and state.plan.bounds["r2"] == (0.0, 6.0)
    feed = {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(outputs(ir.serde.serialize_model(state.model), feed)[0],
                               outputs(model, feed)[0], rtol=1e-4, atol=1e-4)


def spelled_softmax(rng, sum_axis=1, exp_output=False):
    """Gemm → softmax over the classes written as jax2tf writes it (magika): row max bounded by a
    constant, broadcast back by Reshape + Expand, Exp, row sum, Div."""
    n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w": n(7, 5), "b": n(5), "lo": np.float32(-1e30), "col": np.array([-1, 1], np.int64),
             "one": np.array([1, 1], np.int64), "ax": np.array([sum_axis], np.int64)}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="fc"),
             helper.make_node("ReduceMax", ["z"], ["m0"], axes=[1], keepdims=0),
             helper.make_node("Max", ["lo", "m0"], ["m1"]),
             helper.make_node("Reshape", ["m1", "col"], ["m2"]),
             helper.make_node("Expand", ["m2", "one"], ["m"]),
             helper.make_node("Sub", ["z", "m"], ["d"]),
             helper.make_node("Exp", ["d"], ["e"]),
             helper.make_node("ReduceSum", ["e", "ax"], ["s0"], keepdims=0),
             helper.make_node("Reshape", ["s0", "col"], ["s1"]),
             helper.make_node("Expand", ["s1", "one"], ["s"]),
             helper.make_node("Div", ["e", "s"], ["y"], name="div")]
    outputs_ = [fvi("y", ["N", 5])] + ([fvi("e", ["N", 5])] if exp_output else [])
    return make_model(nodes, [fvi("x", ["N", 7])], outputs_, inits)


def test_a_spelled_out_softmax_becomes_one_softmax(rng):
    model = spelled_softmax(rng)
    state = fuse(model)
    assert [n.op_type for n in state.model.graph] == ["Gemm", "Softmax"]
    assert [v.name for v in state.model.graph.outputs] == ["y"]
    x = rng.standard_normal((6, 7)).astype(np.float32) * 4
    z = x.astype(np.float64) @ numpy_helper.to_array(model.graph.initializer[0]) + \
        numpy_helper.to_array(model.graph.initializer[1])
    want = np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    got = outputs(ir.serde.serialize_model(state.model), {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, outputs(model, {"x": x})[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change", ["sum over the batch", "exp also an output"])
def test_what_is_not_a_softmax_over_the_classes_stays(rng, change):
    model = spelled_softmax(rng, sum_axis=0) if change == "sum over the batch" else spelled_softmax(rng, exp_output=True)
    assert "Softmax" not in [n.op_type for n in fuse(model).model.graph]
