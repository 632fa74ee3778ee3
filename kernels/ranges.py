"""Activation range selection from streamed statistics.

Calibration sees each tensor batch by batch and keeps only O(bins) numbers per tensor: a running
[min, max] in a first pass, then a fixed-edge histogram over that range in a second pass. Memory
therefore does not grow with the number of calibration samples.

From the histogram (bin centres c_i, counts n_i) every method picks a clipping range [lo, hi]:

* ``minmax``     — the observed [min, max].
* ``percentile`` — the p-th and (100 − p)-th percentiles (one-sided tensors keep lo = min).
* ``mse``        — the range r·[min, max] minimizing the expected squared error of the 8-bit grid,
                   Σ_i n_i (c_i − x̂(c_i))², over r ∈ (0, 1].
* ``entropy``    — the range r·[min, max] minimizing KL(P ‖ Q), where P is the histogram with the
                   clipped mass folded into its edge bins and Q is P re-quantized to the grid's levels
                   (the TensorRT calibration criterion, on an asymmetric grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxptq.kernels.quant import affine_params, fake_quantize

METHODS = ("minmax", "percentile", "mse", "entropy")
BINS = 2048


@dataclass
class RangeStat:
    """Running [min, max] of a tensor over streamed batches, and its sample count."""

    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in; NaN/Inf were rejected upstream."""
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += x.size


@dataclass
class Histogram:
    """Fixed-edge histogram over [lo, hi] accumulated batch by batch."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))

    def update(self, x: np.ndarray) -> None:
        """Add one batch's values (all lie inside [lo, hi] by construction of the first pass)."""
        if self.hi <= self.lo:
            self.counts[0] += x.size
            return
        idx = ((x.ravel().astype(np.float64) - self.lo) * (len(self.counts) / (self.hi - self.lo))).astype(np.int64)
        self.counts += np.bincount(np.clip(idx, 0, len(self.counts) - 1), minlength=len(self.counts))

    @property
    def centres(self) -> np.ndarray:
        width = (self.hi - self.lo) / len(self.counts)
        return self.lo + width * (np.arange(len(self.counts)) + 0.5)


def _scaled_candidates(lo: float, hi: float, n: int = 100) -> list[tuple[float, float]]:
    return [(lo * r, hi * r) for r in np.linspace(1.0, 1.0 / n, n)]


def _expected_mse(hist: Histogram, lo: float, hi: float, qmax: int) -> float:
    scale, zp = affine_params(lo, hi, 0, qmax)
    c = hist.centres.astype(np.float32)
    return float((hist.counts * (c - fake_quantize(c, scale, zp, 0, qmax)).astype(np.float64) ** 2).sum())


def _kl_after_quantization(hist: Histogram, lo: float, hi: float, levels: int) -> float:
    """KL(P ‖ Q) for the clip range [lo, hi] (TensorRT's criterion on an asymmetric grid).

    P is the histogram inside [lo, hi] with the clipped mass folded into its edge bins; Q is the
    unclipped inside histogram merged into ``levels`` equal-width levels and spread evenly back over
    each level's non-empty bins. Ranges narrower than ``levels`` bins are not candidates (they would
    score KL = 0 by resolving every bin exactly).
    """
    c = hist.centres
    inside = (c >= lo) & (c <= hi)
    if inside.sum() < levels:
        return np.inf
    counts = hist.counts[inside].astype(np.float64)
    p = counts.copy()
    p[0] += hist.counts[c < lo].sum()
    p[-1] += hist.counts[c > hi].sum()
    level = np.minimum(((c[inside] - lo) / (hi - lo) * levels).astype(np.int64), levels - 1)
    nonzero = counts > 0
    mass = np.bincount(level, weights=counts, minlength=levels)
    support = np.bincount(level, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, mass[level] / np.maximum(support[level], 1), 0.0)
    p, q = p / p.sum(), q / max(q.sum(), 1e-30)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))


def select_range(method: str, stat: RangeStat, hist: Histogram | None, bits: int = 8,
                 percentile: float = 99.999) -> tuple[float, float]:
    """Clipping range [lo, hi] of one tensor by ``method`` (see module docstring)."""
    qmax = 2**bits - 1
    if method == "minmax" or hist is None or stat.hi <= stat.lo:
        return stat.lo, stat.hi
    if method == "percentile":
        cdf = np.cumsum(hist.counts) / max(hist.counts.sum(), 1)
        c = hist.centres
        hi = float(c[min(np.searchsorted(cdf, percentile / 100.0), len(c) - 1)])
        lo = stat.lo if stat.lo >= 0 else float(c[np.searchsorted(cdf, 1 - percentile / 100.0)])
        return lo, hi
    if method == "mse":
        return min(_scaled_candidates(stat.lo, stat.hi), key=lambda r: _expected_mse(hist, r[0], r[1], qmax))
    if method == "entropy":
        return min(_scaled_candidates(stat.lo, stat.hi),
                   key=lambda r: _kl_after_quantization(hist, r[0], r[1], qmax + 1))
    raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def needs_histogram(method: str) -> bool:
    """Whether ``method`` needs the second (histogram) pass over the calibration data."""
    return method != "minmax"
