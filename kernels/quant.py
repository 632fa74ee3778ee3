"""Uniform quantization grids, bit-exact with ONNX QuantizeLinear / DequantizeLinear.

A grid is (scale s > 0, zero point z, code range [qmin, qmax]):

    q = clip(rint(x / s) + z, qmin, qmax)        (round half to even, as QuantizeLinear)
    x̂ = (q − z) · s                              (DequantizeLinear)

Activations use an asymmetric unsigned grid whose range always contains 0 (so zero is exact, which
padding and Relu need). Weights use a symmetric signed grid per output channel (z = 0), with the code
range [−127, 127]; where u8×s8 products are summed in saturating int16 pairs (x86 AVX2 without
VNNI) the channel scales are raised until no pair can saturate (``kernels/saturation.py``).
"""

from __future__ import annotations

import numpy as np


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes of ``x``: clip(rint(x / scale) + zero_point, qmin, qmax), as int64.

    ``scale`` and ``zero_point`` broadcast against ``x`` (reshape per-channel values first).
    Divides rather than multiplies by 1/scale, matching onnxruntime's QuantizeLinear.
    """
    q = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32))
    return np.clip(q.astype(np.int64) + np.asarray(zero_point, dtype=np.int64), qmin, qmax)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Real values of codes: (q − zero_point) · scale, as float32."""
    return ((np.asarray(q, np.int64) - np.asarray(zero_point, np.int64)).astype(np.float32)
            * np.asarray(scale, dtype=np.float32))


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """dequantize(quantize(x)): the value a Q→DQ pair passes on."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def affine_params(lo: float, hi: float, qmin: int = 0, qmax: int = 255) -> tuple[np.float32, int]:
    """Scale and zero point of the asymmetric grid covering [lo, hi] ∪ {0}.

    s = (hi' − lo') / (qmax − qmin) with lo' = min(lo, 0), hi' = max(hi, 0); z = clip(rint(qmin − lo'/s)).
    A degenerate range (hi' = lo' = 0) gets s = 1, so the grid is valid and 0 stays exact.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0.0:
        return np.float32(1.0), int(qmin)
    scale = np.float32((hi - lo) / (qmax - qmin))
    zero_point = int(np.clip(np.rint(qmin - lo / float(scale)), qmin, qmax))
    return scale, zero_point


def symmetric_qmax(bits: int) -> int:
    """The largest code of a symmetric signed ``bits``-bit grid, 2^(bits−1) − 1: codes in [−qmax, qmax],
    the most negative two's-complement code left unused so that q and −q are both on the grid."""
    return 2 ** (bits - 1) - 1


def symmetric_scales(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """Per-channel symmetric scales s_c = max|w_c| / qmax, with all-zero channels given s = 1."""
    absmax = np.asarray(absmax, dtype=np.float32)
    return np.where(absmax > 0, absmax / np.float32(qmax), np.float32(1.0)).astype(np.float32)


def clip_floor(qmax: int) -> float:
    """The least clip ratio r the MSE search tries for a grid of ±``qmax``: 0.5 from 4 bits up, 0.1 at 2
    and 3 bits. The fewer the codes, the deeper the MSE-optimal clip cuts into a channel: ternary codes
    (±1) put it at r = 0.30–0.38 on magika's and EfficientNet-Lite0's large layers, 7 codes (±3) at
    0.53–0.69, 15 codes at 0.70–0.94 (measured on their fp32 weights; heavy-tailed channels lower), so a
    floor of 0.5 left a 2-bit layer's squared error up to 1.67× the best clip's (magika's last Dense;
    1.0–1.3× for EfficientNet-Lite0's). From 4 bits up the floor stays where the grids of every result
    so far were searched."""
    return 0.5 if qmax >= 7 else 0.1


def mse_symmetric_scales(w: np.ndarray, axis: int, qmax: int, grid: int = 80) -> np.ndarray:
    """Per-channel symmetric scales minimizing ‖w_c − fake_quantize(w_c)‖² over clip ratios.

    Searches s_c = r · max|w_c| / qmax for r in [``clip_floor(qmax)``, 1] at steps of 0.5 / ``grid``;
    r = 1 (min-max) is always a candidate, so the result is never worse than min-max on the weights
    themselves.
    """
    flat = channel_rows(np.asarray(w, np.float32), axis)
    base = symmetric_scales(np.abs(flat).max(axis=1), qmax)[:, None]
    best_err = np.full(flat.shape[0], np.inf, dtype=np.float64)
    best = base[:, 0].copy()
    floor = clip_floor(qmax)
    for r in np.linspace(1.0, floor, round(grid * (1 - floor) / 0.5), dtype=np.float32):
        s = base * r
        err = ((flat - fake_quantize(flat, s, 0, -qmax, qmax)) ** 2).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = s[better, 0]
    return best.astype(np.float32)


def broadcast_channel(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape per-channel ``values`` so they broadcast along ``axis`` of an ``ndim``-rank tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values).reshape(shape)


def channel_rows(w: np.ndarray, axis: int) -> np.ndarray:
    """``w`` as a [channels, elements] matrix with channels taken along ``axis``."""
    return np.moveaxis(np.asarray(w), axis, 0).reshape(w.shape[axis], -1)


def from_channel_rows(rows: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``channel_rows``: [channels, elements] back to a tensor of ``shape`` with
    channels along ``axis``."""
    moved = (shape[axis], *shape[:axis], *shape[axis + 1:])
    return np.moveaxis(np.asarray(rows).reshape(moved), 0, axis)


def block_rows(w_kn: np.ndarray, block: int) -> np.ndarray:
    """A [K, N] matrix as rows of ``block`` consecutive K-entries, one row per (block, column), in
    [K/block, N] order; K is zero-padded to a multiple of ``block`` (zeros never widen a range)."""
    k, n = w_kn.shape
    nb = -(-k // block)
    padded = np.zeros((nb * block, n), dtype=w_kn.dtype)
    padded[:k] = w_kn
    return padded.reshape(nb, block, n).transpose(0, 2, 1).reshape(nb * n, block)


def affine_rows(rows: np.ndarray, qmin: int, qmax: int, method: str, grid: int = 41) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric grid (scale s, zero point z) of each row of ``rows`` over all its qmax − qmin + 1 codes:
    ŵ = (clip(rint(w/s) + z, qmin, qmax) − z)·s. The row's range [lo, hi] ∪ {0} gives s = (hi − lo)/(qmax −
    qmin) and z = rint(qmin − lo/s) (``minmax``); ``mse`` also tries the range shrunk about its centre by
    r on a uniform grid in [0.2, 1] and keeps the r with the least ‖w − ŵ‖², so it is never worse than
    min-max. z is kept in int8 (the DequantizeLinear after a lookup of int8 codes); a shrunk range whose
    zero point falls outside is priced with the clipped z.

    A symmetric grid leaves the most negative code unused, a third of a 2-bit grid's four levels: MiniLM-L6's
    word embeddings (fake-quantized, mean output cosine to fp32 on 200 emails) keep 0.974 on four levels
    against 0.907 on three, and 0.9978 against 0.9971 at 4 bits."""
    if method not in ("minmax", "mse"):
        raise ValueError(f"unknown weight range method {method!r}; choose minmax or mse")
    rows = np.asarray(rows, np.float32)
    lo, hi = np.minimum(rows.min(axis=1), 0.0), np.maximum(rows.max(axis=1), 0.0)
    centre, half = (lo + hi) / 2, np.where(hi > lo, (hi - lo) / 2, np.float32(0.5))
    best_err = np.full(len(rows), np.inf)
    best_s, best_z = np.ones(len(rows), np.float32), np.zeros(len(rows), np.int64)
    for r in np.linspace(1.0, 0.2, grid if method == "mse" else 1, dtype=np.float32):
        s = (2 * r * half / (qmax - qmin)).astype(np.float32)
        z = np.clip(np.rint(qmin - (centre - r * half) / s), -128, 127).astype(np.int64)
        err = ((rows - fake_quantize(rows, s[:, None], z[:, None], qmin, qmax)) ** 2).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best_err[better], best_s[better], best_z[better] = err[better], s[better], z[better]
    return best_s, best_z


def block_scales(scale: np.ndarray, block: int, k: int) -> np.ndarray:
    """Per-block scales [K/block, N] repeated to one per entry of a [K, N] matrix."""
    return np.repeat(scale, block, axis=0)[:k]


def row_scales(rows: np.ndarray, qmax: int, method: str) -> np.ndarray:
    """Symmetric scale of each row of ``rows``: min-max (max|w|/qmax) or ``mse`` (clip search)."""
    if method == "minmax":
        return symmetric_scales(np.abs(rows).max(axis=1), qmax)
    if method == "mse":
        return mse_symmetric_scales(rows, 0, qmax)
    raise ValueError(f"unknown weight range method {method!r}; choose minmax or mse")
