"""4-bit activations on int8 kernels: the fused graph and its codes, against an integer simulation."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxptq
from conftest import cnn, fvi, make_model
from onnxptq.passes.verification import optimized_kernels
from onnxptq.runtime import session
from onnxptq.simulate import check_layers, fused_codes
from onnxptq.target import resolve_target


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
# The tensors that own the grids the weighted layers read (MaxPool and Flatten move their input's codes).
LAYER_INPUTS = {"relu-bounded": ["x", "r1", "gp"], "signed": ["x", "c1", "r2", "gp"]}


def compile_a4(rng, which, tmp_path, **options):
    model = MODELS[which](rng)
    x = rng.standard_normal((24, 3, 16, 16)).astype(np.float32)
    options = {"w_bits": 4, "a_bits": 4, "first_last_8bit": False, "target": "ort-cpu-avx2", **options}
    result = onnxptq.compile(model, {"x": x}, tmp_path / "q.onnx", **options)
    return model, onnx.load(tmp_path / "q.onnx"), result, x


def inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("which", MODELS)
def test_a4_runs_on_integer_kernels_only(rng, which, tmp_path):
    """The 4-bit tensors are exactly the weighted layers' inputs, each one uint8 pair with a Clip(0, 15)
    on the codes between Q and DQ (the other quantized tensors keep 256 codes); onnxruntime keeps every
    layer on an integer kernel and the Clip on the codes."""
    _, q, result, _ = compile_a4(rng, which, tmp_path)
    ver = result.report["verification"]
    assert ver["coverage"] == 1.0, ver["float_leftovers"]
    kernels = optimized_kernels(q)
    ops = sorted(kernels.values())
    assert {kernels[n] for n in ("conv1", "conv2")} == {"QLinearConv"} and kernels["fc"] == "QGemm"
    assert kernels["add"] == "QLinearAdd" and kernels["gap"] == "QLinearGlobalAveragePool"
    moving = ("QGemm", "MaxPool", "Flatten", "Clip")  # MaxPool/Flatten move codes, Clip clips them
    float_ops = [op for op in ops if not op.startswith("QLinear") and op not in moving]
    assert float_ops == ["QuantizeLinear"], f"only the input Q runs in float: {ops}"
    caps = [n for n in q.graph.node if n.name.endswith("_cap")]
    assert {n.name for n in caps} == {f"{t}_cap" for t in LAYER_INPUTS[which]}
    assert all(kernels[n.name] == "Clip" for n in caps)
    zero_points = inits(q)
    assert int(zero_points["cap_high15"]) == 15 and int(zero_points["cap_low"]) == 0
    if which == "signed":
        assert zero_points["c1_zero_point"] > 0, "a signed grid keeps its negative codes"
    relu = "r1" if which == "relu-bounded" else "r2"
    assert zero_points[f"{relu}_zero_point"] == 0
    assert "relu1" not in kernels and "relu2" not in kernels, "bounded activations are still absorbed"


def test_absorbed_activation_keeps_its_name_for_sequential_adaquant(rng, tmp_path):
    """A 4-bit grid drops the absorbed Relu; the tensor its consumers read keeps the Relu output's name,
    so sequential AdaQuant, which reads layer inputs from the emitted model by name, still finds it."""
    _, q, result, _ = compile_a4(rng, "relu-bounded", tmp_path, pipeline="adaquant:mode=sequential:iterations=2")
    producers = {o: n for n in q.graph.node for o in n.output}
    assert producers["r1"].op_type == "DequantizeLinear" and "relu1" not in {n.name for n in q.graph.node}
    assert result.report["verification"]["coverage"] == 1.0


@pytest.mark.parametrize("which", MODELS)
def test_a4_codes_match_integer_simulation(rng, which, tmp_path):
    """Per Conv layer, the codes onnxruntime's fused kernels produce equal the numpy integer simulation
    of the planned grids from the layer's own input codes (off by one only at float rounding ties), and
    the 4-bit tensors the next layers read are those codes clipped to [0, 15]."""
    _, q, result, x = compile_a4(rng, which, tmp_path)
    convs = ["conv1", "conv2"] + (["conv3"] if which == "signed" else [])
    check = check_layers(q, convs, {"x": x[:4]})
    assert check["layers"] == len(convs) and check["unexplained"] == 0, check
    assert check["tie_differences"] <= 0.01 * check["codes"]
    simulated = result.report["verification"]["integer_simulation"]
    assert simulated["ops"] == {"Conv": len(convs), "Gemm": 1, "Add": 1} and simulated["unexplained"] == 0, simulated
    capped = LAYER_INPUTS[which][1:]
    codes = fused_codes(q, [f"{t}{part}" for t in capped for part in ("_quantized", "_capped")], {"x": x[:4]})
    # The Convs' outputs overflow their clipped 4-bit ranges; the pooled input of fc (last) may not.
    assert all(codes[f"{t}_quantized"].max() > 15 for t in capped[:-1]), "the caps have work to do"
    for t in capped:
        np.testing.assert_array_equal(codes[f"{t}_capped"], np.minimum(codes[f"{t}_quantized"], 15))


@pytest.mark.skipif(resolve_target("ort-cpu").name != "ort-cpu-avx2", reason="needs a CPU without VNNI")
def test_simulation_catches_int16_saturation(rng, tmp_path):
    """Full-range 8-bit weights (the VNNI target) saturate vpmaddubsw's int16 pair sums on this CPU: the
    integer simulation must report those codes as unexplained."""
    model = cnn(rng)
    x = rng.standard_normal((24, 3, 16, 16)).astype(np.float32) * 3
    result = onnxptq.compile(model, {"x": x}, tmp_path / "q.onnx", target="ort-cpu-vnni", weight_method="minmax")
    check = check_layers(onnx.load(tmp_path / "q.onnx"), ["conv1", "conv2"], {"x": x[:8]})
    assert check["unexplained"] > 0, check
    assert result.report["verification"]["integer_simulation"]["unexplained"] > 0


def test_first_and_last_layers_stay_8bit(rng, tmp_path):
    _, q, result, _ = compile_a4(rng, "signed", tmp_path, first_last_8bit=True)
    qi = inits(q)
    assert result.report["model"]["first_last_8bit"] == ["conv1", "fc"]
    assert np.abs(qi["w1_quantized"]).max() > 7 and np.abs(qi["wf_quantized"]).max() > 7
    assert np.abs(qi["w2_quantized"]).max() == 7
    caps = {n.name for n in q.graph.node if n.name.endswith("_cap")}
    assert not caps & {"x_cap", "fl_cap", "gp_cap"}, "the first and last layers read 8-bit inputs"
    assert "c1_cap" in caps, "the first layer's output is a 4-bit tensor"
    assert result.report["verification"]["coverage"] == 1.0


def test_size_target_stores_int4_and_keeps_integer_kernels(rng, tmp_path):
    """ort-cpu-size: Conv weights are packed int4 behind a Cast that onnxruntime folds at load, so the
    layer still runs on QLinearConv; the file is smaller than the speed build's."""
    (tmp_path / "speed").mkdir()
    _, speed, _, _ = compile_a4(np.random.default_rng(1), "signed", tmp_path / "speed", a_bits=8)
    _, small, result, _ = compile_a4(np.random.default_rng(1), "signed", tmp_path, a_bits=8, target="ort-cpu-size",
                                   short_names=False)
    stored = {i.name: i.data_type for i in small.graph.initializer}
    assert stored["w2_quantized"] == onnx.TensorProto.INT4
    kernels = optimized_kernels(small)
    assert kernels["conv2"] == "QLinearConv" and kernels["fc"] == "MatMulNBits"
    assert result.report["verification"]["coverage"] == 1.0
    np.testing.assert_array_equal(inits(small)["w2_quantized"].astype(np.int8), inits(speed)["w2_quantized"])
    assert small.ByteSize() < speed.ByteSize()


@pytest.mark.parametrize("which", MODELS)
def test_capped_encoding_equals_plain_uint4_qdq(which, tmp_path):
    """The speed encoding (uint8 codes clipped to [0, 15] between Q and DQ) and generic-qdq's plain
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


def test_cli_a4_and_targets(cnn_files, tmp_path, capsys):
    from onnxptq.cli import main

    model, calib = cnn_files
    out = tmp_path / "q.onnx"
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(out), "--w-bits", "4", "--a-bits", "4",
                 "--target", "ort-cpu-size", "--no-first-last-8bit", "--keep-names", "-q"]) == 0
    q = onnx.load(out)
    assert {i.name: i.data_type for i in q.graph.initializer}["w2_quantized"] == onnx.TensorProto.INT4
    assert any(n.name.endswith("_cap") for n in q.graph.node)
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "r.onnx"), "--a-bits", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--a-bits" in err[0] and not (tmp_path / "r.onnx").exists()
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "g.onnx"), "--w-bits", "4",
                 "--a-bits", "4", "--target", "generic-qdq", "--min-coverage", "1", "-q"]) == 1
    assert "not measured for target generic-qdq" in capsys.readouterr().err
