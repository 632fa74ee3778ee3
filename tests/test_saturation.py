"""Pair-safe weight grids: the numerics, and onnxruntime computing them exactly on AVX2 without VNNI."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxptq
from conftest import fvi, make_model
from onnxptq.kernels.quant import channel_rows, quantize, row_scales
from onnxptq.kernels.saturation import int16_pair_dot, pair_safe_scales, pairs_fit, reduction_rows
from onnxptq.runtime import session
from onnxptq.target import host_has_int32_dot


def adversarial_rows(rng: np.random.Generator) -> np.ndarray:
    """[6, 27] rows: same-sign runs (every pair saturates at full range), alternating signs, a lone
    outlier, random normal, and an all-zero row; K odd so the last code pairs with padding."""
    k = 27
    return np.stack([
        np.ones(k), -np.ones(k), np.tile([1.0, -1.0], k)[:k] * rng.uniform(0.5, 1, k),
        np.r_[5.0, np.full(k - 1, 0.1)], rng.standard_normal(k), np.zeros(k),
    ]).astype(np.float32)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_pair_safe_scales_are_safe_minimal_and_never_lower(rng, method):
    heavy_tailed = rng.standard_t(2, (200, 27)).astype(np.float32)
    rows = np.concatenate([adversarial_rows(rng), heavy_tailed])
    base = row_scales(rows, 127, method)
    scale = pair_safe_scales(rows, base, 127)
    assert (scale >= base).all()
    assert pairs_fit(quantize(rows, scale[:, None], 0, -127, 127)).all()
    raised = scale > base
    assert raised[:2].all() and not raised[5], "same-sign rows must move, the zero row must not"
    # one float32 step lower is unsafe: the scale is raised no further than needed
    below = np.nextafter(scale, np.float32(0))[raised]
    assert not pairs_fit(quantize(rows[raised], below[:, None], 0, -127, 127)).any()


def test_pair_safe_codes_never_saturate_int16_pairs(rng):
    rows = adversarial_rows(rng)
    full = quantize(rows, row_scales(rows, 127, "minmax")[:, None], 0, -127, 127)
    safe = quantize(rows, pair_safe_scales(rows, row_scales(rows, 127, "minmax"), 127)[:, None], 0, -127, 127)
    x = np.concatenate([np.full((1, 27), 255), rng.integers(0, 256, (63, 27))])[:, None, :]  # worst case first
    for codes, exact in ((safe, True), (full, False)):
        assert np.array_equal(int16_pair_dot(x, codes), (x * codes.astype(np.int64)).sum(-1)) == exact


def test_small_grids_are_safe_as_they_are(rng):
    rows = adversarial_rows(rng)
    base = row_scales(rows, 7, "minmax")
    assert np.array_equal(pair_safe_scales(rows, base, 7), base)


def test_reduction_rows_follow_the_kernels():
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)  # [M, C, kh, kw]
    rows = reduction_rows(w, "Conv", 0)
    np.testing.assert_array_equal(rows[0, :4], [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0], w[0, 0, 0, 1]])
    depthwise = np.ones((4, 1, 3, 3), np.float32)
    assert reduction_rows(depthwise, "Conv", 0, group=4) is None, "depthwise accumulates in int32"
    assert reduction_rows(depthwise, "Conv", 0, group=2).shape == (4, 9), "a channel multiplier saturates"
    w_kn = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(reduction_rows(w_kn, "MatMul", 1), w_kn.T)
    np.testing.assert_array_equal(reduction_rows(w_kn.T, "Gemm", 0), w_kn.T)


def adversarial_conv(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv 3×3, 16 → 8 channels, pads 1: channels 0/1 all +1/−1 (every pair of codes 127 saturates
    when both activations exceed half range), the rest random."""
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.5
    w[0], w[1] = 1.0, -1.0
    b = rng.standard_normal(8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return make_model([node], [fvi("x", ["N", 16, 6, 6])], [fvi("y", ["N", 8, 6, 6])], {"w": w, "b": b})


def integer_reference(q: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The output codes of the emitted QDQ conv computed exactly in integers: ConvInteger's int64-exact
    accumulator plus the int32 bias, requantized as QLinearConv does, rint(acc · (s_x·s_w)/s_y) + z_y."""
    init = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    s_x, z_x, s_y, z_y = init["x_scale"], init["x_zero_point"], init["y_scale"], init["y_zero_point"]
    x_q = quantize(x, s_x, z_x, 0, 255).astype(np.uint8)
    conv = helper.make_node("ConvInteger", ["x", "w", "zx"], ["acc"], pads=[1, 1, 1, 1])
    acc = ReferenceEvaluator(conv).run(None, {"x": x_q, "w": init["w_quantized"], "zx": z_x})[0]
    acc = acc.astype(np.int64) + init["b_quantized"][None, :, None, None]
    multiplier = (s_x * init["w_scale"] / s_y).astype(np.float32)[None, :, None, None]
    return np.clip(np.rint(acc.astype(np.float32) * multiplier) + z_y, 0, 255)


def ort_codes(q: onnx.ModelProto, x: np.ndarray, level: str) -> np.ndarray:
    init = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    y = session(q, threads=1, level=level).run(None, {"x": x})[0]
    return np.rint(y / init["y_scale"]) + init["y_zero_point"]


@pytest.fixture(scope="module")
def compiled():
    """The adversarial conv compiled for each target, with 16 calibration and 4 test samples in [0, 1]."""
    rng = np.random.default_rng(0)
    model = adversarial_conv(rng)
    x = rng.uniform(0, 1, (20, 16, 6, 6)).astype(np.float32)
    return {t: onnxptq.compile(model, {"x": x[:16]}, target=t).model for t in ("ort-cpu-avx2", "ort-cpu-vnni")}, x[16:]


needs_avx2 = pytest.mark.skipif(host_has_int32_dot(), reason="this CPU accumulates u8×s8 in int32: cannot saturate")


@needs_avx2
@pytest.mark.parametrize("level", ["extended", "all"])
def test_avx2_target_is_exact_on_this_host(compiled, level):
    models, x = compiled
    q = models["ort-cpu-avx2"]
    codes = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == "w_quantized"))
    assert np.abs(codes).max() > 64, "random channels use more than the old 7-bit grid"
    assert pairs_fit(channel_rows(np.moveaxis(codes, 1, -1), 0)).all()
    np.testing.assert_array_equal(ort_codes(q, x, level), integer_reference(q, x))


@needs_avx2
def test_unconstrained_full_range_saturates_on_this_host(compiled):
    """The check above has teeth: the same conv with full-range codes (the VNNI grid) is wrong here."""
    models, x = compiled
    q = models["ort-cpu-vnni"]
    diff = np.abs(ort_codes(q, x, "extended") - integer_reference(q, x))
    assert diff[:, :2].max() > 2, "channels 0/1 should saturate with full-range codes"
