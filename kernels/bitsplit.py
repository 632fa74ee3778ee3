"""BitSplit (Wang, Chen, He, Cheng; ICML 2020): b-bit weights by bit-plane splitting, response
reconstruction and stitching.

Symmetric codes q ∈ [−Q, Q], Q = 2^{b−1} − 1, are written as b − 1 ternary planes

    q = Σ_{i=0}^{b−2} 2^{b−2−i} · B_i,      B_i ∈ {−1, 0, 1}

(plane 0 is the most significant; any such sum lies in [−Q, Q], so stitched codes are always in
range, and b = 2 is the single plane q = B_0). A weight row w_c (output channel c, K inputs) is
w_c = s_c ⊙ q_c with a positive scale per channel — or per block of ``block`` consecutive inputs,
for blocked int4 grids — written s_c[k] = α_c[k // block]. (The paper writes w = α' ⊙ Σ_i 2^{−i}B_i
with α' = 2^{b−2}·α; α here is the grid scale emission divides by.)

Given the layer statistics A_g = XᵀX, b_c = Xᵀy_c, ‖y_c‖² (``kernels/response.py``), the solver
minimizes the response error of every channel independently,

    f_c(α_c, B) = ‖y_c − X w_c‖² = ‖y_c‖² − 2·b_cᵀw_c + w_cᵀ A_g w_c,

1. **starts** — round-to-nearest on the given grid, and the weight-space fixed point
   q = clip(rint(w/α), −Q, Q), α = ⟨w, q⟩/⟨q, q⟩ started from that grid and from the min-max grid
   α = max|w|/Q (the given grid's clip can sit deep in the channel at 2–3 bits, ``kernels.quant.clip_floor``,
   and the descent below ends in the local optimum of its start);
2. **α step** — α_c in closed form given the codes: with Q_c = [K, nb] the codes spread over their
   blocks, α_c = argmin f_c = (Q_cᵀ A Q_c)⁺ Q_cᵀ b_c (per channel, nb = 1: α = qᵀb / qᵀAq); a
   negative α flips the block's planes instead (same w);
3. **plane steps** — for each plane i, exact coordinate descent over its entries k with everything
   else fixed: with the residual gradient r = A w_c − b_c and t = 2^{b−2−i}·s_c[k], moving B_i[k] by
   δ changes f_c by 2·δ·t·r_k + δ²·t²·A_kk, so the entry takes the best of {−1, 0, 1} (staying put
   unless that strictly lowers f_c) and r is updated by δ·t·A[:, k];

repeating 2–3 from each start until the total objective decreases by less than ``tol`` (relative) or
``max_iter`` iterations, and keeping for each channel the run that ends lowest (f_c depends on channel
c's codes and scales alone). No step can increase f_c, so the result is never worse than round-to-nearest. All
channels are updated at once (vectorized over c), one input entry k at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxptq.kernels.quant import quantize, symmetric_qmax
from onnxptq.kernels.response import ResponseStats, gram_product


@dataclass
class BitSplitResult:
    """``codes`` [C, K] integers in [−Q, Q]; ``scale`` [C, nb] positive; per-channel objectives of
    round-to-nearest (``rtn``) and of the result (``objective``); ``history`` the total objective after
    init and after every α or plane step; ``iterations`` the α + planes rounds run."""

    codes: np.ndarray
    scale: np.ndarray
    rtn: np.ndarray
    objective: np.ndarray
    history: list[float]
    iterations: int


def split_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Ternary planes [b−1, *codes.shape] of integer ``codes``: B_i = sign(q)·(bit b−2−i of |q|)."""
    mag, sign = np.abs(codes).astype(np.int64), np.sign(codes).astype(np.int8)
    return np.stack([sign * ((mag >> (bits - 2 - i)) & 1).astype(np.int8) for i in range(bits - 1)])


def stitch(planes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes q = Σ_i 2^{b−2−i}·B_i of ternary ``planes`` [b−1, …] (int64)."""
    weights = 2 ** np.arange(bits - 2, -1, -1, dtype=np.int64)
    return np.tensordot(weights, planes.astype(np.int64), axes=1)


def fit_scales(w: np.ndarray, scale: np.ndarray, qmax: int, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Weight-space fixed point per row of ``w`` [R, n] from ``scale`` [R]: alternate
    q = clip(rint(w/α), −Q, Q) and α = ⟨w, q⟩/⟨q, q⟩ (each step lowers ‖w − αq‖²) until q is stable.
    Rows whose codes vanish keep their scale. Returns (codes [R, n], α [R])."""
    alpha = np.asarray(scale, np.float64).copy()
    q = quantize(w, alpha[:, None], 0, -qmax, qmax)
    for _ in range(iters):
        qq = np.einsum("rn,rn->r", q, q)
        alpha = np.where(qq > 0, np.einsum("rn,rn->r", w, q) / np.maximum(qq, 1), alpha)
        new = quantize(w, alpha[:, None], 0, -qmax, qmax)
        if np.array_equal(new, q):
            break
        q = new
    return q, alpha


def _blocks(a: np.ndarray, block: int) -> np.ndarray:
    """[C, K] → [C, nb, block] (K is a multiple of ``block`` after padding)."""
    return a.reshape(a.shape[0], -1, block)


class _Problem:
    """The solver's working state: planes, scales, weights, residual gradient, per-channel objective."""

    def __init__(self, stats: ResponseStats, planes: np.ndarray, alpha: np.ndarray, bits: int, block: int):
        self.stats, self.bits, self.block = stats, bits, block
        self.groups = stats.channel_groups()
        self.diag = np.diagonal(stats.gram, axis1=1, axis2=2)[self.groups]  # A_kk per channel [C, K]
        self.planes, self.alpha = planes, alpha
        self.refresh()

    @property
    def codes(self) -> np.ndarray:
        return stitch(self.planes, self.bits)

    def entry_scales(self) -> np.ndarray:
        return np.repeat(self.alpha, self.block, axis=1)

    def refresh(self) -> None:
        """Recompute w, r = A w − b and f exactly (incremental updates drift by rounding)."""
        self.w = self.entry_scales() * self.codes
        self.grad = gram_product(self.stats.gram, self.w) - self.stats.xty
        self.f = self.stats.yy + np.einsum("ck,ck->c", self.w, self.grad - self.stats.xty)

    def alpha_step(self) -> None:
        """α_c = (Q_cᵀ A Q_c)⁺ Q_cᵀ b_c per channel; blocks with no response (Q_cᵀ A Q_c has a zero
        diagonal entry: no codes, or codes only on inputs that never fire) keep their scale, which
        costs nothing as they do not couple to the others. Channels that would get worse (rounding
        in a near-singular system) keep their scales too."""
        q = self.codes.astype(np.float64)
        c, nb = self.alpha.shape
        g, k, _ = self.stats.gram.shape
        gram = np.empty((c, nb, nb))
        for j in range(nb):  # (A q^{(j)}) with q^{(j)} the codes of block j only: [C, K]
            cols = slice(j * self.block, (j + 1) * self.block)
            aq = (q[:, cols].reshape(g, -1, self.block) @ self.stats.gram[:, cols, :]).reshape(c, k)
            gram[:, :, j] = _blocks(q * aq, self.block).sum(axis=2)
        h = _blocks(q * self.stats.xty, self.block).sum(axis=2)
        diag = np.diagonal(gram, axis1=1, axis2=2)
        dead = diag <= 1e-12 * np.maximum(diag.max(axis=1, keepdims=True), np.finfo(float).tiny)
        gram[dead] = 0.0
        gram[:, np.arange(nb), np.arange(nb)] += dead  # identity rows/columns for dead blocks
        h = np.where(dead, self.alpha, h)
        alpha = np.einsum("cij,cj->ci", np.linalg.pinv(gram, hermitian=True), h)
        flip = alpha < 0
        old = (self.planes.copy(), self.alpha, self.f)
        self.planes *= np.where(np.repeat(flip, self.block, axis=1), -1, 1).astype(np.int8)[None]
        self.alpha = np.where(np.abs(alpha) > 0, np.abs(alpha), self.alpha)
        self.refresh()
        worse = self.f > old[2]
        if worse.any():
            self.planes[:, worse] = old[0][:, worse]
            self.alpha[worse] = old[1][worse]
            self.refresh()

    def plane_step(self, i: int, chunk: int = 64) -> None:
        """One exact coordinate-descent sweep over the entries of plane i (all channels at once).

        Entries are visited in chunks of ``chunk``: inside a chunk only the chunk's part of r is kept
        current (through A[chunk, chunk]); after it, r gains the chunk's weight change times A[chunk, :]
        in one matrix product — the same arithmetic as updating all of r after every entry.
        """
        unit = 2 ** (self.bits - 2 - i)
        t_all = unit * self.entry_scales()
        plane = self.planes[i]
        c, k_total = plane.shape
        g = self.stats.gram.shape[0]
        for start in range(0, k_total, chunk):
            cols = slice(start, min(start + chunk, k_total))
            local = self.stats.gram[:, cols, cols]  # [G, m, m]
            rows = local if g == 1 else local[self.groups]  # A[chunk, chunk] per channel (broadcast if G = 1)
            r_chunk = self.grad[:, cols].copy()
            before = plane[:, cols].copy()
            for j in range(r_chunk.shape[1]):
                k = start + j
                t = t_all[:, k]
                a, r = t * t * self.diag[:, k], t * r_chunk[:, j]
                old = plane[:, k]
                # f is a convex parabola in the entry v: the best v ∈ {−1, 0, 1} is its vertex
                # old − r/a rounded and clipped. A_kk = 0 (an input that never fires) gives 0/0 = nan:
                # such an entry does not affect f and stays.
                with np.errstate(divide="ignore", invalid="ignore"):
                    new = np.clip(np.rint(old - r / a), -1, 1)
                delta = new - old
                change = delta * (2 * r + a * delta)
                better = change < 0
                if not better.any():
                    continue
                plane[better, k] = new[better]
                r_chunk += np.where(better, delta * t, 0.0)[:, None] * rows[:, j]
                self.f += np.where(better, change, 0.0)
            dw = (plane[:, cols] - before) * t_all[:, cols]
            if dw.any():
                self.w[:, cols] += dw
                self.grad += (dw.reshape(g, -1, dw.shape[1]) @ self.stats.gram[:, cols, :]).reshape(c, k_total)


def solve(stats: ResponseStats, w: np.ndarray, bits: int, scale: np.ndarray, block: int | None = None,
          max_iter: int = 30, tol: float = 1e-5) -> BitSplitResult:
    """BitSplit codes and scales for weight rows ``w`` [C, K] (channel c reads group c // (C/G) of
    ``stats``), starting from the round-to-nearest grid ``scale`` [C, nb] (nb = ⌈K/block⌉, or [C]
    / [C, 1] per channel). See the module docstring for the method."""
    if bits < 2:
        raise ValueError("BitSplit needs at least 2 bits (one ternary plane)")
    w = np.asarray(w, np.float64)
    c, k = w.shape
    block = block or k
    nb = -(-k // block)
    pad = nb * block - k
    scale0 = np.asarray(scale, np.float64).reshape(c, nb)
    qmax = symmetric_qmax(bits)
    if pad:  # zero inputs on the padding: A, b vanish there, so those entries never move
        stats = _padded(stats, pad)
        w = np.pad(w, [(0, 0), (0, pad)])
    rows = _blocks(w, block).reshape(c * nb, block)
    rtn_codes = quantize(rows, scale0.reshape(-1, 1), 0, -qmax, qmax)
    peak = np.abs(rows).max(axis=1)
    minmax = np.where(peak > 0, peak / qmax, scale0.reshape(-1))  # an all-zero row keeps its grid
    starts = [(rtn_codes, scale0.reshape(-1).copy())] + [fit_scales(rows, s, qmax) for s in (scale0.reshape(-1), minmax)]
    runs = [_Problem(stats, split_planes(codes.reshape(c, -1), bits), alpha.reshape(c, nb), bits, block)
            for codes, alpha in starts]
    rtn_objective = runs[0].f.copy()
    histories, iterations = zip(*(_descend(run, bits, max_iter, tol) for run in runs))
    best = np.argmin(np.stack([run.f for run in runs]), axis=0)  # per channel: the channels are independent
    problem = runs[0]
    for i, run in enumerate(runs[1:], 1):
        problem.planes[:, best == i] = run.planes[:, best == i]
        problem.alpha[best == i] = run.alpha[best == i]
    problem.refresh()
    history = min(histories, key=lambda h: h[0]) + [float(problem.f.sum())]
    return BitSplitResult(codes=problem.codes[:, :k], scale=problem.alpha, rtn=rtn_objective,
                          objective=problem.f, history=history, iterations=sum(iterations))


def _descend(problem: _Problem, bits: int, max_iter: int, tol: float) -> tuple[list[float], int]:
    """Steps 2–3 from ``problem``'s start until the total objective falls by less than ``tol``
    (relative) in a round, or ``max_iter`` rounds; (the totals after the start and every step, rounds)."""
    history = [float(problem.f.sum())]
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        start = history[-1]
        problem.alpha_step()
        history.append(float(problem.f.sum()))
        for i in range(bits - 1):
            problem.plane_step(i)
            history.append(float(problem.f.sum()))
        if start - history[-1] <= tol * abs(start):
            break
    return history, iterations


def _padded(stats: ResponseStats, pad: int) -> ResponseStats:
    """``stats`` with ``pad`` zero inputs appended."""
    g, k, _ = stats.gram.shape
    out = ResponseStats(g, k + pad, stats.xty.shape[0])
    out.gram[:, :k, :k] = stats.gram
    out.xty[:, :k] = stats.xty
    out.yy[:], out.ysum[:] = stats.yy, stats.ysum
    out.xsum[:, :k] = stats.xsum
    out.rows = stats.rows
    return out
