"""Pair-safe weight grids for u8×s8 kernels that sum adjacent products into a saturating int16.

x86 CPUs without VNNI run onnxruntime's u8 (activation) × s8 (weight) kernels on ``vpmaddubsw``: the
reduction Σ_k x_k·w_k is computed as Σ_j sat16(x_{2j}·q_{2j} + x_{2j+1}·q_{2j+1}), with x the *raw*
activation codes in [0, 255] (the zero point is subtracted afterwards, exactly) and sat16 clipping to
[−32768, 32767]. Measured on onnxruntime 1.32 (``python -m benchmarks.probe_saturation``):

* QLinearConv (regular, pointwise, grouped, depthwise with a channel multiplier > 1) reduces each
  output channel over its group's weights in (kh, kw, c) order, pairing positions (0,1), (2,3), … of
  that flattened vector — a pair straddles two taps when C/group is odd;
* QGemm and QLinearMatMul reduce over consecutive K, pairs (0,1), (2,3), …;
* depthwise QLinearConv (C/group = M/group = 1) accumulates in int32 and never saturates.

A pair (a, b) cannot saturate for any activation codes iff

    255·(max(q_a,0) + max(q_b,0)) ≤ 32767   and   255·(min(q_a,0) + min(q_b,0)) ≥ −32768,

i.e. the positive parts of its codes sum to at most 128 and the negative parts to at least −128.
Instead of shrinking every grid to [−64, 64], a channel keeps its scale s (and the [−127, 127] range)
and only raises s to the least float32 value at which its rounded codes q = rint(w/s) satisfy this.
"""

from __future__ import annotations

import numpy as np

from onnxptq.kernels.quant import channel_rows, quantize

PAIR_LIMIT = 128  # ⌊32767/255⌋ = 128 and ⌈−32768/255⌉ = −128: the bound on a pair's same-sign code sum
INT16_MIN, INT16_MAX = -32768, 32767


def reduction_rows(weight: np.ndarray, op_type: str, axis: int, group: int = 1) -> np.ndarray | None:
    """The weight as [output channels, K] in the order onnxruntime's u8×s8 kernel reduces it, or None
    when that kernel accumulates in int32 (depthwise Conv), so no pair constraint applies.

    Conv weights [M, C/group, kh, kw] reduce in (kh, kw, c) order; Gemm/MatMul weights along their
    K axis (the axis that is not the channel ``axis``).
    """
    if op_type == "Conv":
        if weight.shape[1] == 1 and group == weight.shape[0]:
            return None
        return np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1)
    if op_type in ("Gemm", "MatMul"):
        return channel_rows(weight, axis)
    raise ValueError(f"no u8×s8 kernel reduction order known for {op_type}")


def _pad_even(a: np.ndarray) -> np.ndarray:
    """``a`` with its last axis padded by one 0 when odd: the kernels pad K so, and a zero pairs freely."""
    if a.shape[-1] % 2 == 0:
        return a
    return np.concatenate([a, np.zeros_like(a[..., :1])], axis=-1)


def _pairs(rows: np.ndarray) -> np.ndarray:
    """[..., K] as [..., ⌈K/2⌉, 2]: the adjacent pairs (0,1), (2,3), … of the reduction."""
    padded = _pad_even(rows)
    return padded.reshape(*padded.shape[:-1], -1, 2)


def _sign_sums(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, Σ max(v, 0) and Σ min(v, 0): the pair's extreme sums over activations in [0, 1]."""
    return np.clip(pairs, 0, None).sum(axis=-1), np.clip(pairs, None, 0).sum(axis=-1)


def pairs_fit(codes: np.ndarray) -> np.ndarray:
    """Per row of [C, K] ``codes``: whether every adjacent pair has Σ max(q,0) ≤ 128 and Σ min(q,0) ≥ −128."""
    pos, neg = _sign_sums(_pairs(np.asarray(codes, np.int64)))
    return (pos <= PAIR_LIMIT).all(axis=1) & (neg >= -PAIR_LIMIT).all(axis=1)


def _fits_at(rows: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """pairs_fit of the codes emission writes for ``rows`` at per-row ``scale`` (same quantize call)."""
    return pairs_fit(quantize(rows, scale[:, None], 0, -qmax, qmax))


def pair_safe_scales(rows: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Per row, the least float32 s ≥ scale whose codes clip(rint(w/s), −qmax, qmax) are pair-safe.

    Codes shrink monotonically as s grows (float32 division and rint are monotone), so the safe
    scales form a ray [s*, ∞), found by bisection on the float32 bit patterns between ``scale`` (kept
    when already safe) and an upper bound that is always safe: with S = the largest same-sign pair
    sum Σ|w| of the row, s ≥ S/127 gives codes summing to at most 127·(1 + 2⁻²³) + 1 < 129.
    """
    rows = np.asarray(rows, np.float32)
    scale = np.asarray(scale, np.float32).copy()
    if 2 * qmax <= PAIR_LIMIT:
        return scale
    bad = ~_fits_at(rows, scale, qmax)
    if not bad.any():
        return scale
    sub = rows[bad]
    pos, neg = _sign_sums(_pairs(sub))
    worst = np.maximum(pos, -neg).max(axis=1)
    # Positive float32s order like their int32 bit patterns: bisect on those, lo unsafe, hi safe.
    lo = scale[bad].view(np.int32).astype(np.int64)
    hi = np.maximum(scale[bad], worst / np.float32(127)).astype(np.float32).view(np.int32).astype(np.int64)
    while (gap := hi - lo > 1).any():
        mid = (lo[gap] + hi[gap]) // 2
        fits = _fits_at(sub[gap], mid.astype(np.int32).view(np.float32), qmax)
        hi[gap] = np.where(fits, mid, hi[gap])
        lo[gap] = np.where(fits, lo[gap], mid)
    scale[bad] = hi.astype(np.int32).view(np.float32)
    return scale


def int16_pair_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_k x_k·w_k over the last axis as ``vpmaddubsw`` computes it: adjacent products (0,1), (2,3), …
    summed into a saturating int16, then widened and added exactly (an odd K is padded with 0)."""
    pair_sums = _pairs(np.asarray(x, np.int64) * np.asarray(w, np.int64)).sum(axis=-1)
    return np.clip(pair_sums, INT16_MIN, INT16_MAX).sum(axis=-1)
