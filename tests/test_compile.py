"""End to end on synthetic models: structure after onnxruntime's optimizer, integer codes, numerics."""

import hashlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxptq
from conftest import cnn, fvi, make_model
from onnxptq.passes.verification import optimized_kernels
from onnxptq.runtime import session


def inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_cnn_fuses_fully_and_agrees(cnn_files, tmp_path):
    model_path, calib = cnn_files
    result = onnxptq.compile(model_path, calib, tmp_path / "q.onnx", target="ort-cpu-avx2")
    ver = result.report["verification"]
    assert ver["coverage"] == 1.0 and ver["float_leftovers"] == []
    kernels = optimized_kernels(onnx.load(tmp_path / "q.onnx"))
    assert kernels["conv1"] == kernels["conv2"] == "QLinearConv"
    assert kernels["add"] == "QLinearAdd" and kernels["gap"] == "QLinearGlobalAveragePool"
    assert kernels["fc"] == "QGemm"
    assert "relu1" not in kernels and "clip2" not in kernels, "bounded activations are absorbed"
    assert ver["outputs"]["y"]["sqnr_db"] > 30 and ver["outputs"]["y"]["top1_agreement"] == 1.0


def test_weight_and_bias_codes(cnn_files, tmp_path):
    model_path, calib = cnn_files
    src = inits(onnx.load(model_path))
    q = onnx.load(onnxptq.compile(model_path, calib, tmp_path / "q.onnx", target="ort-cpu-vnni",
                                  weight_method="minmax", pipeline="calibration") and tmp_path / "q.onnx")
    qi = inits(q)
    codes, scale = qi["w1_quantized"], qi["w1_scale"]
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127, "full 8-bit range, full use of it"
    np.testing.assert_allclose(scale, np.abs(src["w1"]).reshape(8, -1).max(1) / 127, rtol=1e-6)
    # bias at scale s_x * s_w, int32, rounding to nearest
    s_x = qi["x_scale"]
    np.testing.assert_allclose(qi["b1_scale"], s_x * scale, rtol=1e-6)
    assert qi["b1_quantized"].dtype == np.int32
    np.testing.assert_array_equal(qi["b1_quantized"], np.rint(src["b1"] / (s_x * scale)).astype(np.int32))
    # Relu output grid starts at zero (so onnxruntime can drop the Relu); MaxPool shares its grid
    assert qi["r1_zero_point"] == 0 and qi["p1_scale"] == qi["r1_scale"]
    assert qi["r2_zero_point"] == 0 and qi["r2_scale"] <= np.float32(6 / 255)


def test_vnni_target_uses_full_range(cnn_files, tmp_path):
    model_path, calib = cnn_files
    onnxptq.compile(model_path, calib, tmp_path / "q.onnx", target="ort-cpu-vnni", weight_method="minmax")
    assert np.abs(inits(onnx.load(tmp_path / "q.onnx"))["w1_quantized"]).max() == 127


def test_integer_kernels_match_float_simulation(cnn_files, tmp_path):
    """The fused integer graph computes what the QDQ graph says, within a code of the output grid."""
    model_path, calib = cnn_files
    onnxptq.compile(model_path, calib, tmp_path / "q.onnx", target="ort-cpu-avx2")
    q = onnx.load(tmp_path / "q.onnx")
    x = {"x": np.load(calib)["x"][:4]}
    fused = session(q, level="all").run(None, x)[0]
    simulated = session(q, level="disable").run(None, x)[0]
    step = float(inits(q)["fl_scale"]) * np.abs(inits(q)["wf_quantized"] * inits(q)["wf_scale"][:, None]).sum(1).max()
    assert np.abs(fused - simulated).max() <= step


def test_exclude_keeps_nodes_float(cnn_files, tmp_path):
    model_path, calib = cnn_files
    result = onnxptq.compile(model_path, calib, tmp_path / "q.onnx", exclude="conv2|fc")
    names = {layer["node"] for layer in result.report["layers"]}
    assert names == {"conv1"}
    kernels = optimized_kernels(onnx.load(tmp_path / "q.onnx"))
    assert kernels["conv2"] in ("Conv", "FusedConv") and kernels["fc"] == "Gemm"
    assert kernels["conv1"] == "QLinearConv" and kernels["add"] == "Add", "ops reading float layers stay float"


def test_deterministic_bytes(cnn_files, tmp_path):
    model_path, calib = cnn_files
    digests = set()
    for i in range(2):
        onnxptq.compile(model_path, calib, tmp_path / f"q{i}.onnx", seed=3, calib_method="entropy")
        digests.add(hashlib.sha256((tmp_path / f"q{i}.onnx").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_only_the_shapes_the_source_recorded_are_written(cnn_files, tmp_path):
    """The compile infers every intermediate shape; the output keeps only the value_info entries the
    source had (none, then one), as onnxruntime infers the rest at load and a size budget pays for them."""
    model_path, calib = cnn_files
    source = onnx.load(model_path)
    assert not source.graph.value_info
    onnxptq.compile(model_path, calib, tmp_path / "q.onnx")
    assert not onnx.load(tmp_path / "q.onnx").graph.value_info
    inferred = onnx.shape_inference.infer_shapes(source).graph.value_info
    assert len(inferred) > 3
    source.graph.value_info.append(inferred[2])
    onnx.save(source, tmp_path / "shaped.onnx")
    onnxptq.compile(tmp_path / "shaped.onnx", calib, tmp_path / "q2.onnx")
    assert [v.name for v in onnx.load(tmp_path / "q2.onnx").graph.value_info] == [inferred[2].name]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_every_calibration_method_compiles(cnn_files, tmp_path, method):
    model_path, calib = cnn_files
    result = onnxptq.compile(model_path, calib, calib_method=method)
    assert result.report["verification"]["outputs"]["y"]["sqnr_db"] > 20  # measured 24 (entropy) to 46 dB


def mlp(rng, k=64, n=48):
    """MatMul(const) → Add(bias) → Relu → MatMul(const) graph output, with a 3-D activation."""
    w1 = rng.standard_normal((k, n)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((n, 16)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [fvi("x", ["N", 5, k])], [fvi("y", ["N", 5, 16])],
                      {"w1": w1, "w2": w2, "b1": rng.standard_normal(n).astype(np.float32)})


def test_matmul_w8_and_w4(rng, tmp_path):
    model = mlp(rng)
    calib = {"x": rng.standard_normal((20, 5, 64)).astype(np.float32)}
    r8 = onnxptq.compile(model, calib, tmp_path / "q8.onnx")
    assert r8.report["verification"]["coverage"] == 1.0
    k8 = optimized_kernels(onnx.load(tmp_path / "q8.onnx"))
    assert k8["mm1"] == "QLinearMatMul" and k8["bias1"] == "QLinearAdd"
    assert k8["mm2"] == "MatMulIntegerToFloat", "a graph-output MatMul keeps a float output"
    r4 = onnxptq.compile(model, calib, tmp_path / "q4.onnx", w_bits=4, block_size=32, target="ort-cpu-size",
                         first_last_8bit=False, short_names=False)
    q4 = onnx.load(tmp_path / "q4.onnx")
    codes = next(i for i in q4.graph.initializer if i.name == "w1_quantized")
    assert codes.data_type == onnx.TensorProto.INT4
    dq = next(n for n in q4.graph.node if n.name == "w1_DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}
    scale = next(i for i in q4.graph.initializer if i.name == "w1_scale")
    assert scale.data_type == onnx.TensorProto.FLOAT16 and list(scale.dims) == [2, 48], "float16, one per block"
    k4 = optimized_kernels(q4)
    assert k4["mm1"] == "MatMulNBits" and k4["mm2"] == "MatMulNBits", "the scales' Cast folds at load"
    coarse = onnxptq.compile(model, calib, None, w_bits=4, block_size=64, target="ort-cpu-size",
                             first_last_8bit=False, short_names=False).model
    scale = next(i for i in coarse.graph.initializer if i.name == "w1_scale")
    assert list(scale.dims) == [1, 48] and optimized_kernels(coarse)["mm1"] == "MatMulNBits"
    assert r4.report["verification"]["outputs"]["y"]["sqnr_db"] > 15
    # speed-first (the default target): 4-bit codes in int8 storage on the 8-bit integer kernels
    r4s = onnxptq.compile(model, calib, tmp_path / "q4s.onnx", w_bits=4, first_last_8bit=False)
    assert np.abs(inits(onnx.load(tmp_path / "q4s.onnx"))["w1_quantized"]).max() == 7
    k4s = optimized_kernels(onnx.load(tmp_path / "q4s.onnx"))
    assert k4s["mm1"] == "QLinearMatMul" and k4s["mm2"] == "MatMulIntegerToFloat"
    assert r4s.report["verification"]["coverage"] == 1.0


def test_block_scales_are_stored_as_float16_where_the_codes_survive(rng):
    """``half_scales``: float16 when every scale is a normal float16, and then the codes of ŵ = q·s
    (what a solver writes) come back unchanged through the rounded scales; a scale below float16's
    normal range keeps the grid float32."""
    from onnxptq.passes.emission import half_scales

    s = np.exp(rng.uniform(-9, 0, (8, 64))).astype(np.float32)  # 1.2e-4 … 1
    q = rng.integers(-8, 8, s.shape)
    half = half_scales(s)
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) / s - 1).max() <= 2.0**-11
    np.testing.assert_array_equal(np.rint((q * s) / half.astype(np.float32)), q)
    s[3, 5] = 1e-5
    assert half_scales(s).dtype == np.float32


def test_w4_conv_runs_on_int8_kernels_with_4bit_codes(cnn_files, tmp_path):
    model_path, calib = cnn_files
    result = onnxptq.compile(model_path, calib, tmp_path / "q.onnx", w_bits=4, first_last_8bit=False)
    qi = inits(onnx.load(tmp_path / "q.onnx"))
    assert qi["w1_quantized"].dtype == np.int8 and np.abs(qi["w1_quantized"]).max() == 7
    assert result.report["verification"]["coverage"] == 1.0


def test_dead_channel_bias_stays_representable(rng, tmp_path):
    """A channel with ~zero weights but a real bias must not overflow the int32 bias (NaN/inf codes)."""
    model = cnn(rng)
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    w = numpy_helper.to_array(w1).copy()
    w[3] = 1e-38  # a dead channel, as trained networks have
    w1.CopyFrom(numpy_helper.from_array(w, "w1"))
    calib = {"x": rng.standard_normal((20, 3, 16, 16)).astype(np.float32)}
    with np.errstate(invalid="raise"):
        result = onnxptq.compile(model, calib, tmp_path / "q.onnx")
    qi = inits(onnx.load(tmp_path / "q.onnx"))
    b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b1"))
    np.testing.assert_allclose(qi["b1_quantized"][3] * qi["b1_scale"][3], b[3], rtol=1e-3)
    assert result.report["verification"]["outputs"]["y"]["sqnr_db"] > 30
