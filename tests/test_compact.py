"""Goal size's compact per-channel layout (``passes/emission.py``): the same codes as the speed build,
float16 scales, no weight zero point (but a Gemm's), the bias step computed as s_x·s_w in the graph;
onnxruntime still fuses every layer, and the integer simulation reads the folded constants."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxptq
from onnxptq.passes.verification import optimized_kernels
from onnxptq.simulate import QDQGraph
from test_mixed import mlp

LAYERS = {"mm1": "w1", "conv": "wc", "fc": "w3"}  # MatMul, Conv (with bias), Gemm (with bias)


@pytest.fixture
def builds(rng, tmp_path):
    """The mlp at W8A8 built for speed (the host's ort-cpu) and for size, on the same data and plan (no
    corrections: BN re-estimation measures the emitted model, whose scales differ by the rounding)."""
    model, x = mlp(rng), {"x": rng.standard_normal((48, 48)).astype(np.float32)}
    return {target: onnxptq.compile(model, x, tmp_path / f"{target}.onnx", target=target,
                                   pipeline="calibration", short_names=False)
            for target in ("ort-cpu", "ort-cpu-size")}


def test_size_build_stores_the_same_codes_compactly(builds):
    speed, size = (builds[t].model for t in ("ort-cpu", "ort-cpu-size"))
    graph = {t: QDQGraph(builds[t].model) for t in builds}
    dq = {t: {n.name: n for n in builds[t].model.graph.node if n.op_type == "DequantizeLinear"} for t in builds}
    for node, w in LAYERS.items():
        np.testing.assert_array_equal(graph["ort-cpu-size"].array(f"{w}_quantized"),
                                      graph["ort-cpu"].array(f"{w}_quantized"))
        stored = graph["ort-cpu-size"].inits[f"{w}_scale"]
        assert stored.data_type == onnx.TensorProto.FLOAT16, node
        want = graph["ort-cpu"].array(f"{w}_scale")
        np.testing.assert_array_equal(numpy_helper.to_array(stored), want.astype(np.float16))
        assert len(dq["ort-cpu-size"][f"{w}_DequantizeLinear"].input) == (3 if node == "fc" else 2), \
            "no zero point but a Gemm's (onnxruntime's QGemm fusion needs it)"
    for bias, w in (("bc", "wc"), ("b3", "w3")):
        step = dq["ort-cpu-size"][f"{bias}_DequantizeLinear"].input[1]
        assert step not in graph["ort-cpu-size"].inits, "the bias step is computed, not stored"
        s_x = graph["ort-cpu-size"].folded(step) / graph["ort-cpu-size"].folded(f"{w}_scale_unpacked")
        # s_x·s_w in float32 from the float16-rounded s_w: the step the int32 codes were rounded with
        np.testing.assert_allclose(s_x, s_x[0], rtol=1e-6)
        np.testing.assert_array_equal(graph["ort-cpu-size"].folded(step),
                                      np.float32(s_x[0]) * numpy_helper.to_array(
                                          graph["ort-cpu-size"].inits[f"{w}_scale"]).astype(np.float32))
    assert size.ByteSize() < speed.ByteSize()


def test_size_build_fuses_as_the_speed_build_and_simulates_exactly(builds):
    kernels = {t: optimized_kernels(builds[t].model) for t in builds}
    assert {n: kernels["ort-cpu-size"][n] for n in LAYERS} == {n: kernels["ort-cpu"][n] for n in LAYERS}
    assert kernels["ort-cpu-size"]["fc"] == "QGemm" and kernels["ort-cpu-size"]["conv"] == "QLinearConv"
    report = builds["ort-cpu-size"].report["verification"]
    assert report["coverage"] == 1.0
    sim = report["integer_simulation"]
    assert sim["layers"] >= 2 and sim["unexplained"] == 0, sim
