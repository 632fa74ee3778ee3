"""Exact integer simulation of onnxruntime's quantized kernels, for checking emitted codes.

QLinearConv, QGemm and QLinearMatMul with input codes x (zero point z_x, scale s_x), int8 weight
codes q (per output channel scale s_w[m], zero point 0) and int32 bias codes b compute

    acc[m] = Σ_k (x_k − z_x)·q[m, k] + b[m]                       (exact, int32)
    y[m]   = clip(rint(acc[m] · (s_x·s_w[m] / s_y)) + z_y, 0, 255)   (float32 multiplier, ties to even)

(the b-bit activations of ``passes/emission.py`` then clip those codes to [0, 2ᵇ − 1] on uint8).
The simulation's float rounding can differ from the kernel's only where acc·multiplier lies within
float32 error of a half-integer. Kernels with a float output (QGemm without y_scale,
MatMulIntegerToFloat) return acc[m]·(s_x·s_w[m]) instead: there the accumulator itself is compared.

The sums are exact: on x86 without VNNI onnxruntime's u8×s8 kernels saturate adjacent products in
int16 (``kernels/saturation.py``), which the ``ort-cpu-avx2`` target's pair-safe weights rule out, so
the exact sum is what that target guarantees and any saturation shows up as a difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxptq.kernels.im2col import conv_output_shape, im2col


def conv_accumulate(x_codes: np.ndarray, x_zero: int, w_codes: np.ndarray, bias: np.ndarray | None,
                    strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int],
                    group: int = 1) -> np.ndarray:
    """acc [N, M, *O] of a quantized Conv (int64); padding holds the zero point, i.e. contributes 0."""
    centred = np.asarray(x_codes, np.int64) - int(x_zero)
    patches = im2col(centred, w_codes.shape[2:], strides, dilations, pads, group)  # [G, R, K]
    m = w_codes.shape[0]
    w = np.asarray(w_codes, np.int64).reshape(group, m // group, -1)               # [G, M/G, K]
    acc = np.einsum("grk,gmk->rgm", patches, w).reshape(patches.shape[1], m)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    out = conv_output_shape(x_codes.shape[2:], w_codes.shape[2:], strides, dilations, pads)
    return np.moveaxis(acc.reshape(x_codes.shape[0], *out, m), -1, 1)


def matmul_accumulate(x_codes: np.ndarray, x_zero: int, w_codes: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """acc [..., N] of a quantized MatMul/Gemm: Σ_k (x[..., k] − z_x)·q[k, n] + b[n] (int64), with
    ``w_codes`` [K, N]."""
    acc = (np.asarray(x_codes, np.int64) - int(x_zero)) @ np.asarray(w_codes, np.int64)
    return acc if bias is None else acc + np.asarray(bias, np.int64)


def requantize(acc: np.ndarray, multiplier: np.ndarray, zero_point: int, axis: int = 1,
               qmin: int = 0, qmax: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(codes, tie distance): clip(rint(acc·multiplier) + z, qmin, qmax) with a per-channel float32
    multiplier along ``axis``, and |frac(acc·multiplier) − ½| — where it is tiny, the kernel's own
    float rounding may land on the other side."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    return _round(acc.astype(np.float32) * np.asarray(multiplier, np.float32).reshape(shape), zero_point, qmin, qmax)


def add_requantize(a: np.ndarray, a_zero: int, a_ratio: np.float32, b: np.ndarray, b_zero: int,
                   b_ratio: np.float32, zero_point: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, tie distance) of QLinearAdd: clip(rint((a − z_a)·s_a/s_y + (b − z_b)·s_b/s_y) + z_y, 0, 255).

    onnxruntime's AVX2 kernel evaluates the sum in fixed point, each ratio rounded to a multiplier of
    22 bits for the larger one, so each term is off by at most 255·max(ratio)·2⁻²² codes (6·10⁻⁵
    at ratio 1): it can differ from this float form only where the sum lies that close to a
    half-integer, a tie."""
    scaled = (np.asarray(a, np.int64) - int(a_zero)).astype(np.float32) * np.float32(a_ratio) \
        + (np.asarray(b, np.int64) - int(b_zero)).astype(np.float32) * np.float32(b_ratio)
    return _round(scaled, zero_point, 0, 255)


def _round(scaled: np.ndarray, zero_point: int, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(clip(rint(scaled) + z, qmin, qmax), |frac(scaled) − ½|), rint rounding ties to even."""
    codes = np.clip(np.rint(scaled).astype(np.int64) + int(zero_point), qmin, qmax)
    return codes, np.abs(scaled - np.floor(scaled) - 0.5)
