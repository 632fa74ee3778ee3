"""A layer holding most of the weights split into groups of output channels under a byte budget
(passes/groups.py, passes/splitting.py): which layers, exactness of the split, and a budget that
gives the groups different bits."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import onnxptq
from conftest import fvi, make_model
from onnxptq import runtime
from onnxptq.data import load_calibration
from onnxptq.model_io import to_ir
from onnxptq.passes.fusion import FusionPass
from onnxptq.passes.groups import GROUPS, LayerGroupPass
from onnxptq.passes.verification import optimized_kernels
from onnxptq.state import CompileOptions, CompileState


def conv_net(rng, group: int = 1, channels: int = 64, inputs: int = 8) -> onnx.ModelProto:
    """x → Conv 3×3 (``inputs`` → ``channels``, bias; ``group`` input groups) → Relu →
    GlobalAveragePool → Flatten → Gemm (→ 10): the Conv holds most of the weights."""
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"wc": f(channels, inputs // group, 3, 3), "bc": f(channels), "wf": f(10, channels), "bf": f(10)}
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["v"], name="flat"),
             helper.make_node("Gemm", ["v", "wf", "bf"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [fvi("x", ["N", inputs, 6, 6])], [fvi("y", ["N", 10])], inits)


def matmul_net(rng) -> onnx.ModelProto:
    """x [N, 4, 128] → MatMul (128 → 500) → Relu → MatMul (500 → 8): the first holds most of the weights."""
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [fvi("x", ["N", 4, 128])], [fvi("y", ["N", 4, 8])], {"w1": f(128, 500), "w2": f(500, 8)})


def grouped(model: onnx.ModelProto, x: np.ndarray, **options) -> CompileState:
    state = CompileState(source=model, model=to_ir(model), options=CompileOptions(**options),
                         calib=load_calibration({"x": x}, model, None), holdout=None)
    FusionPass().run(state)
    LayerGroupPass().run(state)
    return state


@pytest.mark.parametrize("net, layer, shape", [(lambda rng: conv_net(rng, channels=256, inputs=64), "conv", (24, 64, 6, 6)),
                                               (matmul_net, "mm1", (24, 4, 128))])
def test_the_dominant_layer_is_split_into_groups_that_compute_the_same(rng, net, layer, shape):
    model = net(rng)
    x = rng.standard_normal(shape).astype(np.float32)
    state = grouped(model, x, size_ratio=0.2)
    nodes = [n for n in state.model.graph]
    groups = [n for n in nodes if n.name.startswith(f"{layer}_group")]
    assert len(groups) == GROUPS and layer not in {n.name for n in nodes}
    assert not {"wc", "bc", "w1"} & set(state.model.graph.initializers), "the unsplit weight and bias are dropped"
    assert "Gather" not in {n.op_type for n in nodes}, "consecutive channels need no reordering"
    # the groups hold consecutive rows (Conv) / columns (MatMul) of the weight, in order: 32 each, or 62–63
    weights = [n.inputs[1].const_value.numpy() for n in groups]
    axis = 0 if layer == "conv" else 1
    assert [w.shape[axis] for w in weights] == ([32] * 8 if axis == 0 else [63] * 4 + [62] * 4)
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["wc" if axis == 0 else "w1"]
    np.testing.assert_array_equal(np.concatenate(weights, axis=axis), original)
    split = ir.serde.serialize_model(state.model)
    np.testing.assert_allclose(runtime.session(split).run(None, {"x": x})[0],
                               runtime.session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_no_byte_budget_a_grouped_conv_or_a_small_share_leave_the_layer_whole(rng):
    big = dict(channels=256, inputs=64)
    cases = ((conv_net(rng, **big), {}), (conv_net(rng, **big), {"bops_ratio": 0.2}),
             (conv_net(rng, group=2, **big), {"size_ratio": 0.2}),
             (conv_net(rng, channels=4, inputs=4096), {"size_ratio": 0.2}),  # fewer channels than GROUPS
             (conv_net(rng), {"size_ratio": 0.2}))  # groups of 576 weights: a 3-bit step would not pay
    for model, options in cases:
        channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        x = rng.standard_normal((8, channels, 6, 6)).astype(np.float32)
        assert "conv" in {n.name for n in grouped(model, x, **options).model.graph}, options


def test_a_size_budget_gives_the_groups_their_own_bits_on_integer_kernels(rng, tmp_path):
    model = conv_net(rng, channels=256, inputs=64)
    x = rng.standard_normal((32, 64, 6, 6)).astype(np.float32)
    out = tmp_path / "q.onnx"
    options = dict(size_ratio=0.13, target="ort-cpu-size", candidates="w8a8,w4a8,w3a8")
    result = onnxptq.compile(model, {"x": x}, out, **options)
    choice = {l["node"]: l["choice"] for l in result.report["mixed"]["layers"]}
    groups = {choice[f"conv_group{g}"] for g in range(GROUPS)}
    assert groups == {"w3a8", "w4a8"}, choice  # the budget falls between two widths of the whole Conv
    assert out.stat().st_size <= options["size_ratio"] * model.ByteSize()
    kernels = optimized_kernels(onnx.load(out))
    assert all(kernels[f"conv_group{g}"] == "QLinearConv" for g in range(GROUPS)), kernels
    again = tmp_path / "again.onnx"
    onnxptq.compile(model, {"x": x}, again, **options)
    assert again.read_bytes() == out.read_bytes()


def test_join_groups_writes_the_split_conv_back_as_one_integer_conv(rng, tmp_path):
    """benchmarks/join_groups.py (a diagnostic whose numbers results.md reports): the joined Conv's
    dequantized weight is the groups' weights concatenated exactly, it runs as one QLinearConv, and
    its output differs from the split file's only by the one output grid."""
    from benchmarks.join_groups import join_groups

    model = conv_net(rng, channels=256, inputs=64)
    x = rng.standard_normal((32, 64, 6, 6)).astype(np.float32)
    out = tmp_path / "q.onnx"
    onnxptq.compile(model, {"x": x}, out, size_ratio=0.13, target="ort-cpu-size", candidates="w8a8,w4a8,w3a8")
    split = onnx.load(out)
    joined = onnx.load(out)
    assert join_groups(joined) == 1
    assert [n.name for n in joined.graph.node if n.op_type == "Conv"] == ["conv"]
    assert optimized_kernels(joined)["conv"] == "QLinearConv"
    assert joined.ByteSize() < split.ByteSize()

    def run(m: onnx.ModelProto, extra: list[str]) -> list[np.ndarray]:
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra)
        return runtime.session(m).run(None, {"x": x})

    weights = [n.input[1] for n in split.graph.node if n.op_type == "Conv"]
    y_split, *parts = run(split, weights)
    y_joined, w_joined = run(joined, ["joined0_w"])
    np.testing.assert_array_equal(w_joined, np.concatenate(parts))
    assert np.abs(y_joined - y_split).max() <= 0.02 * np.abs(y_split).max()
