"""4-bit activations on int8 kernels: the fused graph and its codes, against an integer simulation."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxptq
from conftest import cnn, fvi, make_model
from onnxptq.kernels.integer import conv_accumulate, requantize, shift_codes
from onnxptq.passes.verification import optimized_kernels
from onnxptq.runtime import session


def signed_cnn(rng):
    """conv1 (signed output, no activation) → conv2 → Relu → MaxPool → conv3 → Add(skip) → GAP → fc."""
    f = lambda *s: (rng.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    inits = {"w1": f(8, 3, 3, 3), "b1": f(8), "w2": f(8, 8, 3, 3), "b2": f(8), "w3": f(8, 8, 1, 1), "b3": f(8),
             "wf": f(10, 8), "bf": f(10)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c3", "p2"], ["a"], name="add"),
             helper.make_node("GlobalAveragePool", ["a"], ["gp"], name="gap"),
             helper.make_node("Flatten", ["gp"], ["fl"], name="flat"),
             helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [fvi("x", ["N", 3, 16, 16])], [fvi("y", ["N", 10])], inits)


MODELS = {"relu-bounded": cnn, "signed": signed_cnn}


def compile_a4(rng, which, tmp_path, **options):
    model = MODELS[which](rng)
    x = rng.standard_normal((24, 3, 16, 16)).astype(np.float32)
    options = {"w_bits": 4, "a_bits": 4, "first_last_8bit": False, "target": "ort-cpu-avx2", **options}
    result = onnxptq.compile(model, {"x": x}, tmp_path / "q.onnx", **options)
    return model, onnx.load(tmp_path / "q.onnx"), result, x


def inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def fused_codes(model: onnx.ModelProto, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """The uint8 tensors ``names`` as onnxruntime computes them on the fully optimized graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in names:
        probe.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.UINT8, None))
    return dict(zip(names, session(probe, level="all").run(names, feed)))


@pytest.mark.parametrize("which", MODELS)
def test_a4_runs_on_integer_kernels_only(rng, which, tmp_path):
    """Every 4-bit tensor is capped by a QLinearAdd of 0 between its two pairs; onnxruntime keeps every
    layer integer and does not merge the pairs."""
    _, q, result, _ = compile_a4(rng, which, tmp_path)
    ver = result.report["verification"]
    assert ver["coverage"] == 1.0, ver["float_leftovers"]
    kernels = optimized_kernels(q)
    ops = sorted(kernels.values())
    assert {kernels[n] for n in ("conv1", "conv2")} == {"QLinearConv"} and kernels["fc"] == "QGemm"
    assert kernels["add"] == "QLinearAdd" and kernels["gap"] == "QLinearGlobalAveragePool"
    float_ops = [op for op in ops if not op.startswith("QLinear") and op not in ("QGemm", "MaxPool", "Flatten")]
    assert float_ops == ["QuantizeLinear"], f"only the input Q runs in float (MaxPool/Flatten move codes): {ops}"
    caps = [n for n in q.graph.node if n.name.endswith("_cap")]
    assert len(caps) >= 4 and all(kernels[n.name] == "QLinearAdd" for n in caps)
    assert not any(n.op_type in ("Relu", "Clip") for n in q.graph.node), "absorbed activations are replaced"
    zero_points = inits(q)
    if which == "signed":
        assert zero_points["c1_zero_point"] > 0, "a signed grid keeps its negative codes"
        assert zero_points["c1_top_zero_point"] == zero_points["c1_zero_point"] + 240
    relu = "r1" if which == "relu-bounded" else "r2"
    assert zero_points[f"{relu}_zero_point"] == 0 and zero_points[f"{relu}_top_zero_point"] == 240


@pytest.mark.parametrize("which", MODELS)
def test_a4_codes_match_integer_simulation(rng, which, tmp_path):
    """Per Conv layer, the codes onnxruntime's fused kernels produce equal the numpy integer simulation
    of the planned grids from the layer's own input codes (off by one only at float rounding ties),
    and every 4-bit tensor holds codes in [0, 15]."""
    model, q, _, x = compile_a4(rng, which, tmp_path)
    qi = inits(q)
    convs = [n for n in onnx.load_from_string(model.SerializeToString()).graph.node if n.op_type == "Conv"]
    outs = {"relu-bounded": {"conv1": "r1", "conv2": "r2"}, "signed": {"conv1": "c1", "conv2": "r2", "conv3": "c3"}}
    ins = {"relu-bounded": {"conv1": "x", "conv2": "p1"}, "signed": {"conv1": "x", "conv2": "c1", "conv3": "p2"}}
    names = sorted({f"{t}_quantized" for t in (*outs[which].values(), *ins[which].values())}
                   | {f"{t}_top_quantized" for t in outs[which].values()})
    codes = fused_codes(q, names, {"x": x[:4]})
    checked = 0
    for node in convs:
        if node.name not in outs[which]:
            continue
        src, dst = ins[which][node.name], outs[which][node.name]
        w = node.input[1]
        pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [0, 0, 0, 0])
        acc = conv_accumulate(codes[f"{src}_quantized"], int(qi[f"{src}_zero_point"]), qi[f"{w}_quantized"],
                              qi[f"{node.input[2]}_quantized"], [1, 1], [1, 1], pads)
        multiplier = (qi[f"{src}_scale"] * qi[f"{w}_scale"]) / qi[f"{dst}_top_scale"]
        top, tie = requantize(acc, multiplier, int(qi[f"{dst}_top_zero_point"]))
        got_top = codes[f"{dst}_top_quantized"].astype(np.int64)
        off = got_top != top
        assert np.abs(got_top - top).max() <= 1 and (tie[off] < 1e-3).all(), f"{node.name}: {off.sum()} codes off"
        final = shift_codes(got_top, int(qi[f"{dst}_top_zero_point"]), int(qi[f"{dst}_zero_point"]))
        np.testing.assert_array_equal(codes[f"{dst}_quantized"], final)
        assert codes[f"{dst}_quantized"].max() <= 15
        checked += 1
    assert checked == len(outs[which])


def test_first_and_last_layers_stay_8bit(rng, tmp_path):
    _, q, result, _ = compile_a4(rng, "signed", tmp_path, first_last_8bit=True)
    qi = inits(q)
    assert result.report["model"]["first_last_8bit"] == ["conv1", "fc"]
    assert np.abs(qi["w1_quantized"]).max() > 7 and np.abs(qi["wf_quantized"]).max() > 7
    assert np.abs(qi["w2_quantized"]).max() == 7
    assert "x_top_scale" not in qi and "fl_top_scale" not in qi and "gp_top_scale" not in qi, \
        "the first and last layers read 8-bit inputs"
    assert "c1_top_scale" in qi, "the first layer's output is a 4-bit tensor"
    assert result.report["verification"]["coverage"] == 1.0


def test_size_target_stores_int4_and_keeps_integer_kernels(rng, tmp_path):
    """ort-cpu-size: Conv weights are packed int4 behind a Cast that onnxruntime folds at load, so the
    layer still runs on QLinearConv; the file is smaller than the speed build's."""
    (tmp_path / "speed").mkdir()
    _, speed, _, _ = compile_a4(np.random.default_rng(1), "signed", tmp_path / "speed", a_bits=8)
    _, small, result, _ = compile_a4(np.random.default_rng(1), "signed", tmp_path, a_bits=8, target="ort-cpu-size")
    stored = {i.name: i.data_type for i in small.graph.initializer}
    assert stored["w2_quantized"] == onnx.TensorProto.INT4
    kernels = optimized_kernels(small)
    assert kernels["conv2"] == "QLinearConv" and kernels["fc"] == "MatMulNBits"
    assert result.report["verification"]["coverage"] == 1.0
    np.testing.assert_array_equal(inits(small)["w2_quantized"].astype(np.int8), inits(speed)["w2_quantized"])
    assert small.ByteSize() < speed.ByteSize()


@pytest.mark.parametrize("which", MODELS)
def test_capped_encoding_equals_plain_uint4_qdq(which, tmp_path):
    """The speed encoding (uint8 codes capped by two pairs around an Add of 0) and generic-qdq's plain
    int4/uint4 QDQ are one function: the ONNX reference evaluator gives the same outputs for both."""
    from onnx.reference import ReferenceEvaluator

    (tmp_path / "speed").mkdir()
    _, speed, _, x = compile_a4(np.random.default_rng(2), which, tmp_path / "speed", target="ort-cpu-vnni")
    _, plain, result, _ = compile_a4(np.random.default_rng(2), which, tmp_path, target="generic-qdq")
    types = {i.name: i.data_type for i in plain.graph.initializer}
    assert types["w2_quantized"] == onnx.TensorProto.INT4 and types["c1_zero_point" if which == "signed"
                                                                     else "r1_zero_point"] == onnx.TensorProto.UINT4
    assert not any(n.name.endswith("_cap") for n in plain.graph.node)
    assert result.report["verification"]["coverage"] is None
    feed = {"x": x[:3]}
    # the reference evaluator implements DequantizeLinear from opset 19 on
    ref_speed = ReferenceEvaluator(onnx.version_converter.convert_version(speed, 21)).run(None, feed)[0]
    ref_plain = ReferenceEvaluator(plain).run(None, feed)[0]
    np.testing.assert_allclose(ref_speed, ref_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(session(plain, level="basic").run(None, feed)[0], ref_plain, rtol=1e-4, atol=1e-4)
