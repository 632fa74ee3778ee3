"""Convolution as a matrix product: the patches (im2col) a Conv layer multiplies its weight with.

An ONNX Conv with input x [N, C, *S], weight W [M, C/G, *k], strides s, dilations d, pads
(begin b, end e) and G groups computes, for output channel m in group g = m // (M/G),

    y[n, m, o] = Σ_{c < C/G, j < k}  W[m, c, j] · x̃[n, g·C/G + c, o·s + j·d]

with x̃ the zero-padded input. Flattening the patch x̃[n, g·C/G + c, o·s + j·d] over (c, j) gives
one row of X_g [N·ΠO, (C/G)·Πk] per output position (n, o), in the order ``W.reshape(M, -1)`` flattens
the weight, so y[:, m] = X_g · W[m].flatten(): a layer is a least-squares problem in its weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def conv_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              pads: Sequence[int] | None = None, auto_pad: str = "NOTSET") -> list[int]:
    """Explicit ONNX pads [b_1, …, b_r, e_1, …, e_r] of a Conv, resolving ``auto_pad``.

    SAME_UPPER / SAME_LOWER pad so that O = ⌈S/s⌉: total p = max((O − 1)·s + (k − 1)·d + 1 − S, 0),
    the odd unit going at the end (UPPER) or the beginning (LOWER); VALID pads nothing.
    """
    rank = len(spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                 for n, k, s, d in zip(spatial, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        large = [t - t // 2 for t in total]
        return small + large if auto_pad == "SAME_UPPER" else large + small
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * rank)
    return list(pads)


def conv_output_shape(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                      dilations: Sequence[int], pads: Sequence[int]) -> tuple[int, ...]:
    """O_i = ⌊(S_i + b_i + e_i − (k_i − 1)·d_i − 1) / s_i⌋ + 1 for each spatial axis."""
    rank = len(spatial)
    return tuple((n + pads[i] + pads[i + rank] - (k - 1) * d - 1) // s + 1
                 for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)))


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
           pads: Sequence[int], groups: int = 1, rows: np.ndarray | None = None) -> np.ndarray:
    """The patches X_g of every group: [G, R, (C/G)·Πk], R = N·ΠO rows in (n, o) row-major order.

    ``rows`` selects flat row indices (sorted or not) before anything is copied, so sampling a few
    rows of a large layer costs memory for those rows only. Works for any number of spatial axes.
    """
    n, c = x.shape[:2]
    rank = x.ndim - 2
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    # windows[n, c, o_1..o_r, j_1..j_r] = padded[n, c, o·s + j·d] — a strided view, nothing copied
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, 2 + rank)))
    windows = windows[(slice(None), slice(None))
                      + tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, d) for d in dilations)]
    out = windows.shape[2:2 + rank]
    flat = np.arange(n * int(np.prod(out))) if rows is None else np.asarray(rows)
    index = np.unravel_index(flat, (n, *out))
    # Move the row axes to the front, then gather: [R, C, *k]
    picked = np.moveaxis(windows, 1, 1 + rank)[index]
    return picked.reshape(len(flat), groups, -1).transpose(1, 0, 2)


def channels_last_rows(y: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """A layer output [N, M, *O] as [R, M] in the row order of ``im2col`` (optionally only ``rows``)."""
    flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return flat if rows is None else flat[rows]
