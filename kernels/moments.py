"""Per-channel output statistics, streamed over batches, and the affine map that re-standardizes them.

A layer output y has channels along one axis; every other axis (batch, spatial, sequence) indexes
observations of the channel. ``ChannelMoments`` keeps, per channel, the count n, the mean m and the
sum of squared deviations M2 = Σ(y − m)², merged batch by batch with Chan et al.'s update

    n = n_a + n_b,   δ = m_b − m_a,   m = m_a + δ·n_b/n,   M2 = M2_a + M2_b + δ²·n_a·n_b/n

in float64, so memory does not grow with the number of batches and there is no E[y²] − E[y]²
cancellation. ``var`` is the population variance M2/n: the exact average over all observations.
"""

from __future__ import annotations

import numpy as np


class ChannelMoments:
    """Running per-channel mean and variance of tensors whose channels lie along ``axis``."""

    def __init__(self, axis: int):
        self.axis = axis
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, y: np.ndarray) -> None:
        """Merge the observations of one batch ``y`` (any float array with channels on ``axis``)."""
        y = np.asarray(y)
        axis = self.axis % y.ndim
        others = tuple(i for i in range(y.ndim) if i != axis)
        n_b = y.size // y.shape[axis]
        if n_b == 0:
            return
        # Sums accumulate in float64 without a float64 copy of the batch: deviations are taken from the
        # mean rounded to y's dtype, m', and corrected exactly by Σ(y − m)² = Σ(y − m')² − n·(m − m')².
        mean_b = y.sum(axis=others, dtype=np.float64) / n_b
        rounded = mean_b.astype(y.dtype)
        m2_b = np.square(y - np.expand_dims(rounded, others)).sum(axis=others, dtype=np.float64)
        m2_b = np.maximum(m2_b - n_b * (mean_b - rounded) ** 2, 0.0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("no observations")
        return self.m2 / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


def standardizing_scale(std: np.ndarray, target_std: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Per channel a = σ_t/σ: with c = m_t − a·m, a·y + c has mean m_t and std σ_t when y has mean m
    and std σ.

    A channel whose std or target std is at most ``floor`` is constant as far as float32 resolves it
    (a dead channel): its ratio would be one of rounding noise, so it keeps a = 1 and only has its
    mean moved.
    """
    std, target_std = np.asarray(std, np.float64), np.asarray(target_std, np.float64)
    ok = (std > floor) & (target_std > floor)
    return np.where(ok, target_std / np.where(ok, std, 1.0), 1.0)
