"""Second-order statistics of a linear layer's response, accumulated over batches of rows.

A layer whose output channel c reads the inputs of its group g(c) computes y_c = X_{g(c)}·w_c
(pre-bias). The squared response error of any weight w_c,

    f_c(w) = ‖y_c − X_g w‖² = ‖y_c‖² − 2·b_cᵀw + wᵀ A_g w,    A_g = X_gᵀX_g,  b_c = X_gᵀ y_c,

depends on the data only through A_g (K×K per group), b_c (K per channel) and ‖y_c‖², so these can be
summed batch by batch with memory independent of the number of rows. Rows may be subsampled per batch
with a weight (rows kept · weight ≈ rows seen), keeping every statistic an unbiased estimate of the sum.

With the column sums s_g = Σ x and t_c = Σ y_c also kept, the error left after the best bias shift
β_c = (t_c − s_gᵀw)/n is the same quadratic in the centered statistics (``centered``):
A_g − s_g s_gᵀ/n, b_c − s_g t_c/n, ‖y_c‖² − t_c²/n.
"""

from __future__ import annotations

import numpy as np


class ResponseStats:
    """Running A_g = Σ XᵀX [G, K, K], b = Σ YᵀX [M, K] (row c: X_{g(c)}ᵀ y_c), ‖y_c‖² [M], the sums
    Σ x [G, K] and Σ y [M], and the row count n, all float64."""

    def __init__(self, groups: int, k: int, channels: int):
        if channels % groups:
            raise ValueError(f"{channels} output channels do not split into {groups} groups")
        self.gram = np.zeros((groups, k, k))
        self.xty = np.zeros((channels, k))
        self.yy = np.zeros(channels)
        self.xsum = np.zeros((groups, k))
        self.ysum = np.zeros(channels)
        self.rows = 0.0

    @classmethod
    def weight_space(cls, w: np.ndarray, groups: int = 1) -> ResponseStats:
        """The statistics of ‖w_c − ŵ_c‖² for weight rows ``w`` [M, K]: a layer fed the K unit inputs."""
        c, k = w.shape
        stats = cls(groups, k, c)
        stats.update(np.broadcast_to(np.eye(k), (groups, k, k)), np.asarray(w).T)
        return stats

    @property
    def groups(self) -> int:
        return self.gram.shape[0]

    def channel_groups(self) -> np.ndarray:
        """g(c) for every output channel c: channels are split into G consecutive equal groups."""
        channels = self.xty.shape[0]
        return np.arange(channels) // (channels // self.groups)

    def update(self, x: np.ndarray, y: np.ndarray, weight: float = 1.0) -> None:
        """Add rows: ``x`` [G, R, K] (patches per group), ``y`` [R, M] (pre-bias outputs), each row
        counted ``weight`` times."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        g, r, _ = x.shape
        self.gram += weight * np.matmul(x.transpose(0, 2, 1), x)
        y_g = y.reshape(r, g, -1).transpose(1, 2, 0)  # [G, M/G, R]
        self.xty += weight * np.matmul(y_g, x).reshape(self.xty.shape)
        self.yy += weight * np.einsum("rm,rm->m", y, y)
        self.xsum += weight * x.sum(axis=1)
        self.ysum += weight * y.sum(axis=0)
        self.rows += weight * r

    def centered(self) -> ResponseStats:
        """The statistics of the error left after each channel's best bias shift (see the module)."""
        out = ResponseStats(self.groups, self.gram.shape[1], self.xty.shape[0])
        n = max(self.rows, 1.0)
        out.gram = self.gram - np.einsum("gk,gl->gkl", self.xsum, self.xsum) / n
        out.xty = self.xty - self.ysum[:, None] * self.xsum[self.channel_groups()] / n
        out.yy = self.yy - self.ysum**2 / n
        out.rows = self.rows
        return out

    def ridge(self, w: np.ndarray, strength: float) -> ResponseStats:
        """The statistics of ‖y_c − X_g ŵ_c‖² + μ_g·‖w_c − ŵ_c‖², μ_g = strength·tr(A_g)/K: the response
        error plus the weight error of ``w`` [M, K] weighted as if the inputs were white with the
        calibration inputs' mean energy per entry."""
        out = ResponseStats(self.groups, self.gram.shape[1], self.xty.shape[0])
        k = self.gram.shape[1]
        mu = strength * np.trace(self.gram, axis1=1, axis2=2) / k  # [G]
        w = np.asarray(w, np.float64)
        out.gram = self.gram + mu[:, None, None] * np.eye(k)
        mu_c = mu[self.channel_groups()]
        out.xty = self.xty + mu_c[:, None] * w
        out.yy = self.yy + mu_c * np.einsum("ck,ck->c", w, w)
        out.xsum, out.ysum, out.rows = self.xsum, self.ysum, self.rows
        return out

    def bias_shift(self, w: np.ndarray) -> np.ndarray:
        """β_c = (t_c − s_gᵀw_c)/n: the mean of y_c − X_g w_c, the bias change that removes it."""
        return (self.ysum - np.einsum("ck,ck->c", self.xsum[self.channel_groups()], w)) / max(self.rows, 1.0)

    def objective(self, w: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
        """f_c(w_c) = ‖y_c‖² − 2·b_cᵀw_c + w_cᵀ A_{g(c)} w_c for weights ``w`` [M, K]; one value per channel.
        With a bias ``shift`` β [M] added to the layer's output, ‖y_c − X_g w_c − β_c‖² =
        f_c(w_c) − 2·β_c·(t_c − s_gᵀw_c) + n·β_c²."""
        w = np.asarray(w, np.float64)
        aw = gram_product(self.gram, w)
        f = self.yy - 2 * np.einsum("ck,ck->c", self.xty, w) + np.einsum("ck,ck->c", w, aw)
        if shift is None:
            return f
        beta = np.asarray(shift, np.float64)
        mean_error = self.ysum - np.einsum("ck,ck->c", self.xsum[self.channel_groups()], w)
        return f - 2 * beta * mean_error + self.rows * beta**2


def gram_product(gram: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row c of the result is A_{g(c)}·w_c for ``w`` [M, K], channels in G consecutive groups (A is
    symmetric, so w_cᵀA = (A w_c)ᵀ): one batched product."""
    g, k, _ = gram.shape
    return (np.asarray(w, np.float64).reshape(g, -1, k) @ gram).reshape(-1, k)
