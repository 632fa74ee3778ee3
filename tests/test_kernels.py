import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxptq.kernels.quant import (affine_params, affine_rows, block_rows, broadcast_channel, fake_quantize,
                                   mse_symmetric_scales, quantize, symmetric_scales)
from onnxptq.kernels.ranges import Histogram, RangeStat, select_range


def reference_quantize(x, scale, zp, axis=None):
    """ONNX QuantizeLinear evaluated by onnx.reference."""
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    return ReferenceEvaluator(node).run(None, {"x": x, "s": scale, "z": zp})[0]


def test_quantize_matches_onnx_reference_per_tensor_uint8(rng):
    x = rng.standard_normal(5000).astype(np.float32) * 3
    x[:8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 127.5, 1e9, -1e9], np.float32) * np.float32(0.02)
    scale, zp = np.float32(0.02), np.uint8(128)
    ours = quantize(x, scale, zp, 0, 255)
    assert np.array_equal(ours, reference_quantize(x, scale, zp).astype(np.int64))


def test_quantize_matches_onnx_reference_per_channel_int8(rng):
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    s = symmetric_scales(np.abs(w).reshape(6, -1).max(1), 127)
    ours = quantize(w, broadcast_channel(s, 0, 4), 0, -127, 127)
    ref = reference_quantize(w, s, np.zeros(6, np.int8), axis=0)
    assert np.array_equal(ours, ref.astype(np.int64))


def test_affine_params_keep_zero_exact_and_cover_range():
    for lo, hi in [(-1.3, 2.7), (0.0, 6.0), (0.5, 3.0), (-4.0, -1.0)]:
        s, z = affine_params(lo, hi)
        assert fake_quantize(np.float32(0.0), s, z, 0, 255) == 0.0
        assert fake_quantize(np.float32(min(lo, 0)), s, z, 0, 255) == pytest.approx(min(lo, 0), abs=float(s) / 2)
        assert fake_quantize(np.float32(max(hi, 0)), s, z, 0, 255) == pytest.approx(max(hi, 0), abs=float(s) / 2)
    assert affine_params(0.0, 0.0) == (1.0, 0)


def test_relu_range_gets_zero_point_zero():
    s, z = affine_params(0.0, 6.0)
    assert z == 0 and s == np.float32(6.0 / 255)


def test_mse_weight_scales_never_worse_than_minmax(rng):
    w = rng.standard_t(3, size=(16, 64)).astype(np.float32)
    s_mm = symmetric_scales(np.abs(w).max(1), 7)
    s_mse = mse_symmetric_scales(w, 0, 7)
    err = lambda s: ((w - fake_quantize(w, s[:, None], 0, -7, 7)) ** 2).sum(1)  # noqa: E731
    assert np.all(err(s_mse) <= err(s_mm) + 1e-9)
    assert np.any(err(s_mse) < err(s_mm) * 0.95), "heavy tails should be clipped for a lower error"


@pytest.mark.parametrize("qmax", [1, 3])
def test_mse_weight_scales_reach_the_best_clip_of_a_fine_search(rng, qmax):
    """At 2 and 3 bits, on normal and Student-t rows, the searched scale's error is within 1% of the best
    of 2000 clip ratios in (0, 1]; at 2 bits (±1) that best clip lies below r = 0.5, which a search
    floored there (as from 4 bits up) misses by more than 10% on every row."""
    w = np.concatenate([rng.standard_normal((8, 1280)), rng.standard_t(4, (8, 1280))]).astype(np.float32)
    err = lambda s: ((w - fake_quantize(w, s[:, None], 0, -qmax, qmax)) ** 2).sum(1)  # noqa: E731
    s_mm = symmetric_scales(np.abs(w).max(1), qmax)
    fine = np.min([err(s_mm * r) for r in np.linspace(1.0, 5e-4, 2000, dtype=np.float32)], axis=0)
    assert np.all(err(mse_symmetric_scales(w, 0, qmax)) <= fine * 1.01)
    floored = np.min([err(s_mm * r) for r in np.linspace(1.0, 0.5, 80, dtype=np.float32)], axis=0)
    assert (qmax == 1) == np.all(floored > fine * 1.1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_affine_rows_use_every_code_and_mse_is_never_worse(rng, bits):
    """Min-max: each row's lowest and highest value (0 included) land on the end codes; MSE: no row's
    error above min-max's, heavy tails clipped for less below 8 bits; a row far from 0 keeps an int8 zero
    point."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = rng.standard_t(3, size=(12, 500)).astype(np.float32)
    w[0] = rng.uniform(40, 41, 500)  # all positive, far from 0
    err = lambda s, z: ((w - fake_quantize(w, s[:, None], z[:, None], qmin, qmax)) ** 2).sum(1)  # noqa: E731
    s_mm, z_mm = affine_rows(w, qmin, qmax, "minmax")
    codes = quantize(w, s_mm[:, None], z_mm[:, None], qmin, qmax)
    assert np.all(codes[1:].min(1) == qmin) and np.all(codes[1:].max(1) == qmax)
    np.testing.assert_allclose(s_mm[1:], (w[1:].max(1) - w[1:].min(1)) / (qmax - qmin), rtol=1e-5)
    s_mse, z_mse = affine_rows(w, qmin, qmax, "mse")
    assert np.all(err(s_mse, z_mse) <= err(s_mm, z_mm) * (1 + 1e-6))
    if bits < 8:  # (with 256 codes the grid search's steps of 0.02 find nothing better than the range)
        assert np.mean(err(s_mse, z_mse)[1:] < 0.9 * err(s_mm, z_mm)[1:]) > 0.5, "heavy tails are clipped"
    assert np.all((-128 <= z_mse) & (z_mse <= 127)) and np.all((-128 <= z_mm) & (z_mm <= 127))


def test_block_rows_layout():
    w = np.arange(12, dtype=np.float32).reshape(6, 2)  # K=6, N=2
    rows = block_rows(w, 4)  # blocks [0:4], [4:6]+pad
    assert rows.shape == (4, 4)
    assert np.array_equal(rows[0], w[0:4, 0]) and np.array_equal(rows[1], w[0:4, 1])
    assert np.array_equal(rows[2], [8, 10, 0, 0]) and np.array_equal(rows[3], [9, 11, 0, 0])


def test_streamed_statistics_equal_one_shot(rng):
    batches = [rng.standard_normal(1000).astype(np.float32) * (i + 1) for i in range(5)]
    stat = RangeStat()
    for b in batches:
        stat.update(b)
    allx = np.concatenate(batches)
    assert (stat.lo, stat.hi) == (float(allx.min()), float(allx.max()))
    hist = Histogram(stat.lo, stat.hi)
    for b in batches:
        hist.update(b)
    ref, _ = np.histogram(allx, bins=len(hist.counts), range=(stat.lo, stat.hi))
    assert np.abs(hist.counts - ref).sum() <= 2  # bin-edge float rounding only
    assert hist.counts.sum() == allx.size and hist.counts.nbytes == 2048 * 8


def _stats(x):
    stat = RangeStat()
    stat.update(x)
    hist = Histogram(stat.lo, stat.hi)
    hist.update(x)
    return stat, hist


def test_range_methods_on_heavy_tailed_data(rng):
    x = np.concatenate([rng.standard_normal(200_000), [60.0, -55.0]]).astype(np.float32)
    stat, hist = _stats(x)
    assert select_range("minmax", stat, hist) == (stat.lo, stat.hi)
    lo, hi = select_range("percentile", stat, hist, percentile=99.99)
    assert -6 < lo < -3 and 3 < hi < 6
    for method in ("mse", "entropy"):
        lo, hi = select_range(method, stat, hist)
        assert stat.lo < lo < 0 < hi < stat.hi, method
    # mse must beat min-max on the grid's actual squared error
    def err(lo, hi):
        s, z = affine_params(lo, hi)
        return float(((x - fake_quantize(x, s, z, 0, 255)) ** 2).sum())
    assert err(*select_range("mse", stat, hist)) < err(stat.lo, stat.hi)


def test_one_sided_percentile_keeps_zero(rng):
    x = np.abs(rng.standard_normal(10000)).astype(np.float32)
    stat, hist = _stats(x)
    lo, hi = select_range("percentile", stat, hist, percentile=99.9)
    assert lo == stat.lo and hi < stat.hi


def test_unknown_method_raises():
    stat = RangeStat(-1, 1, 10)
    with pytest.raises(ValueError):
        select_range("bogus", stat, Histogram(-1, 1))
