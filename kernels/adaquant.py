"""AdaQuant (Hubara et al. 2021, CalibTIP): fit one layer's weights, bias and quantization steps to
its fp32 response, by Adam on hand-derived gradients.

A planned layer is a matrix product over rows (``onnxptq/capture.py``): for group g, input patches
X_g [R, K] and pre-bias fp32 outputs Y [R, M], channel c reading group g(c). With the fake quantizer

    Q(v; s, z, [lo, hi]) = s·(clip(rint(v/s) + z, lo, hi) − z)

the quantized layer and the loss are

    x̂ = Q(X; s_x, z_x, [0, 2ᵇ − 1]),   ŵ_c = Q(W_c + V_c; s_w,c, 0, [qmin, qmax]),
    P = x̂_g(c) · ŵ_cᵀ + b_c,           L = mean_{r,c} (a(P) − a(Y + b₀))²

with b₀ the layer's fp32 bias and a the Relu/Clip the layer's output grid absorbs (the identity
otherwise), so the loss is taken after the activation on both sides; plus, with ``weight_term`` ρ,
ρ·Σ (ŵ − W)², the drift of the quantized weights from the layer's float weights W (``anchor``;
∂/∂ŵ = 2ρ(ŵ − W)). A blocked grid has one step per
(channel, block of K) instead of per channel; a float-input layer (int4 MatMulNBits) has x̂ = X.

Gradients, with E = a(P) − a(Y + b₀) and G = 2E/(R·M) ⊙ 1[lo_a < P < hi_a] (zero where a clips):

    ∂L/∂b_c = Σ_r G_rc,   ∂L/∂ŵ_g = G_gᵀ·x̂_g,   ∂L/∂x̂_g = G_g·ŵ_g

and through each quantizer, with u = v/s and the integer code k = rint(u) + z:

    ∂Q/∂v = 1[lo ≤ k ≤ hi]                                       (straight-through, zero outside the clip)
    ∂Q/∂s = rint(u) − u inside the clip, clip(k, lo, hi) − z outside      (LSQ)

These are the exact derivatives of the surrogate in which the rounding offset δ = rint(u) − u is held
fixed (Q = s·(clip(u + δ + z, lo, hi) − z)): ``loss_and_grad`` takes such frozen offsets, which is
how the tests check every gradient against finite differences.

Parameters are optimized in normalized units, so one learning rate per group fits every layer (Adam
moves each parameter by about its learning rate per step): V = v·s_w⁰ (weights in units of their
initial step), s_w = ρ_w·s_w⁰ and s_x = ρ_x·s_x⁰ (relative steps), b = b⁰ + β·σ_c (bias in units of
the channel's fp32 output spread). The fit starts from round-to-nearest (v = 0, ρ = 1, β = 0),
keeps the iterate with the least loss on a fixed probe of rows, and returns it only if it lowers the
loss on all cached rows, so a layer never ends worse than round-to-nearest on its objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Params = dict[str, np.ndarray]  # "v" [M, K], "w_scale" (ρ_w) [M, nb], "bias" (β) [M], "x_scale" (ρ_x) [1]
# Adam learning rates per group, in the normalized units above. Chosen on EfficientNet-Lite0 W4A8 (every
# 4th layer, 100–300 steps): weights 1e-2 / 3e-3 / 1e-3 left the layer loss at ×0.40 / 0.37 / 0.33 of
# round-to-nearest (geometric mean) after 300 steps, ×0.38 for 3e-3 after 100; steps and bias at 1e-2
# instead of 1e-3 did worse (×0.40).
LEARNING_RATES = {"v": 3e-3, "w_scale": 1e-3, "bias": 1e-3, "x_scale": 1e-3}
# Rows per matrix product when the loss is evaluated on all cached rows (bounds the memory of a pass).
CHUNK = 4096
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


@dataclass
class LayerProblem:
    """One layer's fit. ``weight`` [M, K] in im2col order with steps ``w_step`` [M, nb] over blocks of
    ``block`` K-entries (nb = 1, block = K for per-channel grids); ``x_step`` None for a float input."""

    weight: np.ndarray
    w_step: np.ndarray
    block: int
    w_range: tuple[int, int]
    groups: int
    bias: np.ndarray
    fp32_bias: np.ndarray
    bias_unit: np.ndarray
    learn_bias: bool = True
    learn_weights: bool = True
    x_step: float | None = None
    x_zero: int = 0
    x_range: tuple[int, int] = (0, 255)
    learn_x_step: bool = False
    x_step_max: float = np.inf
    bound: tuple[float, float] | None = None
    weight_term: float = 0.0
    anchor: np.ndarray | None = None

    def anchor_weight(self) -> np.ndarray:
        """The float weights the weight term measures drift from: ``anchor``, else ``weight``."""
        return self.weight if self.anchor is None else self.anchor

    def initial(self) -> Params:
        """Round-to-nearest: v = 0, ρ = 1, β = 0."""
        dtype = self.weight.dtype
        return {"v": np.zeros_like(self.weight), "w_scale": np.ones(self.w_step.shape, dtype),
                "bias": np.zeros(len(self.bias), dtype), "x_scale": np.ones(1, dtype)}

    def learning(self) -> dict[str, bool]:
        return {"v": self.learn_weights, "w_scale": True, "bias": self.learn_bias,
                "x_scale": self.x_step is not None and self.learn_x_step}

    def repeat(self, per_block: np.ndarray) -> np.ndarray:
        """[M, nb] per-block values spread over the K columns of [M, K]."""
        return np.repeat(per_block, self.block, axis=1)[:, :self.weight.shape[1]]

    def solution(self, theta: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
        """(W + V [M, K], s_w [M, nb], b [M], s_x) of parameters ``theta``, in the weight's dtype."""
        step = self.repeat(self.w_step)
        s_x = None if self.x_step is None else float(self.x_step * theta["x_scale"][0])
        return (self.weight + theta["v"] * step, self.w_step * theta["w_scale"],
                self.bias + theta["bias"] * self.bias_unit, s_x)


def ste_quantize(v: np.ndarray, step: np.ndarray, zero: float, lo: int, hi: int,
                 offset: np.ndarray | None = None, grad: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(Q(v), ∂Q/∂v as a 0/1 mask, ∂Q/∂s) for the grid (step, zero, [lo, hi]); ``offset`` freezes
    δ = rint(u) − u (see the module doc), else the codes are rint(u) + z. Without ``grad`` only Q(v)
    (the activations' quantizer runs over G·R·K patch entries per step: every pass over them counts)."""
    u = v / step
    if offset is None:
        code = np.rint(u)
        offset = code - u if grad else None
    else:
        code = u + offset
    code += zero
    clipped = np.clip(code, lo, hi)
    inside = clipped == code if grad else None
    clipped -= zero
    ds = np.where(inside, offset, clipped) if grad else None
    clipped *= step
    return clipped, inside, ds


@dataclass
class Rounding:
    """Frozen rounding offsets for the weights and the inputs (tests only; None: real rounding)."""

    w: np.ndarray | None = None
    x: np.ndarray | None = None


def offsets(problem: LayerProblem, theta: Params, x: np.ndarray) -> Rounding:
    """The rounding offsets δ = rint(u) − u of both quantizers at ``theta`` on rows ``x`` [G, R, K]."""
    w, s_w, _, s_x = problem.solution(theta)
    u = w / problem.repeat(s_w)
    ux = None if s_x is None else x / s_x
    return Rounding(np.rint(u) - u, None if ux is None else np.rint(ux) - ux)


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """[R, M] → [G, R, M/G]: the channels of each group."""
    r, m = a.shape
    return a.reshape(r, groups, m // groups).transpose(1, 0, 2)


def loss_and_grad(problem: LayerProblem, theta: Params, x: np.ndarray, y: np.ndarray,
                  rounding: Rounding | None = None, grad: bool = True) -> tuple[float, Params]:
    """L and ∂L/∂θ (normalized units) on rows ``x`` [G, R, K], pre-bias targets ``y`` [R, M]."""
    rounding = rounding or Rounding()
    g_count = problem.groups
    w, s_w, b, s_x = problem.solution(theta)
    step = problem.repeat(s_w)
    w_hat, w_in, w_ds = ste_quantize(w, step, 0, *problem.w_range, rounding.w)
    x_ds = None
    if s_x is None:
        x_hat = x
    else:
        learn_x = problem.learning()["x_scale"]
        x_hat, _, x_ds = ste_quantize(x, np.asarray(s_x, x.dtype), problem.x_zero, *problem.x_range, rounding.x,
                                      grad=grad and learn_x)
    w_g = w_hat.reshape(g_count, -1, w_hat.shape[1])  # [G, M/G, K]
    pre = np.matmul(x_hat, w_g.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(y.shape) + b
    target = y + problem.fp32_bias
    if problem.bound is not None:
        lo, hi = problem.bound
        live = (pre > lo) & (pre < hi)
        pre, target = np.clip(pre, lo, hi), np.clip(target, lo, hi)
    err = pre - target
    loss = float(np.mean(np.square(err, dtype=np.float64)))
    if problem.weight_term:
        drift = w_hat - problem.anchor_weight()
        loss += problem.weight_term * float(np.sum(np.square(drift, dtype=np.float64)))
    if not grad:
        return loss, {}
    g = err * (2.0 / err.size)
    if problem.bound is not None:
        g = g * live
    g_g = _grouped(g, g_count)  # [G, R, M/G]
    d_w_hat = np.matmul(g_g.transpose(0, 2, 1), x_hat).reshape(w_hat.shape)  # [M, K]
    if problem.weight_term:
        d_w_hat += (2.0 * problem.weight_term) * drift
    grads = {"v": d_w_hat * w_in * problem.repeat(problem.w_step),
             "w_scale": _block_sum(problem, d_w_hat * w_ds) * problem.w_step,
             "bias": g.sum(axis=0) * problem.bias_unit,
             "x_scale": np.zeros(1, theta["x_scale"].dtype)}
    if x_ds is not None:
        d_x_hat = np.matmul(g_g, w_g)  # [G, R, K]
        grads["x_scale"] = np.array([np.sum(d_x_hat * x_ds) * problem.x_step], theta["x_scale"].dtype)
    return loss, grads


def _block_sum(problem: LayerProblem, a: np.ndarray) -> np.ndarray:
    """[M, K] summed over each block of K: [M, nb]."""
    m, k = a.shape
    nb = problem.w_step.shape[1]
    padded = np.zeros((m, nb * problem.block), a.dtype)
    padded[:, :k] = a
    return padded.reshape(m, nb, problem.block).sum(axis=2)


@dataclass
class Settings:
    """Iterations, rows per step, the learning rate of each parameter group (normalized units), and
    every ``check`` steps the loss on a fixed ``probe`` of rows, the best iterate being kept: the
    straight-through gradient keeps pushing a weight across its rounding boundary and back, so the
    last iterate is often not the best one. A step reads at most ``elements`` patch entries (G·K per
    row), fewer rows for wide rows: a depthwise layer's rows hold G·K = C·k² entries, and quantizing
    them dominated its step (G = 672, k = 5: 60 ms for 256 rows on the benchmark host).

    With ``holdout`` > 0 the last such fraction of the cached rows (``held_rows``) is never trained on:
    the probe and the final keep-if-better test read only it. Rows are cached in calibration-batch
    order, so these come from other samples than the training rows, and a fit that lowers the loss only
    on the rows it was trained on is not kept. Off by default: on EfficientNet-Lite0 (advanced
    pipeline) ⅛ held out gave fp32 top-1 agreement 0.646 vs 0.642 at W4A8 and 0.454 vs 0.473 at W4A4
    (mean KL 0.745 vs 0.917) — the fits there do not overfit their rows (≥ 7168 rows per layer, K ≤ 1152)."""

    iterations: int = 100
    batch: int = 256
    check: int = 25
    probe: int = 2048
    elements: int = 1 << 20
    holdout: float = 0.0
    lr: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))


@dataclass
class Fit:
    theta: Params
    loss_rtn: float
    loss: float
    history: list[float]
    iterations: int
    rows: int


class Adam:
    """Adam (``ADAM_BETAS``, ``ADAM_EPSILON``; bias-corrected m̂ and v̂, ε added to √v̂) with one learning
    rate per parameter group."""

    def __init__(self, theta: Params, lr: dict[str, float]):
        self.lr = lr
        self.m = {k: np.zeros_like(v) for k, v in theta.items()}
        self.v = {k: np.zeros_like(v) for k, v in theta.items()}
        self.t = 0

    def step(self, theta: Params, grads: Params, learning: dict[str, bool]) -> None:
        self.t += 1
        for k, g in grads.items():
            if not learning[k]:
                continue
            b1, b2 = ADAM_BETAS
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            theta[k] = (theta[k] - self.lr[k] * m_hat / (np.sqrt(v_hat) + ADAM_EPSILON)).astype(theta[k].dtype)


def held_rows(count: int, holdout: float) -> range:
    """The rows a fit is judged on: the last ``⌊holdout·count⌋`` of ``count``, or all of them if that
    leaves none (or nothing to train on)."""
    held = int(holdout * count)
    return range(count - held, count) if 0 < held < count else range(count)


def full_loss(problem: LayerProblem, theta: Params, rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
              span: range) -> float:
    """The loss on the cached rows ``span``, in chunks (``rows(index)`` → (x [G, B, K], y [B, M]))."""
    total = 0.0
    for start in range(span.start, span.stop, CHUNK):
        index = np.arange(start, min(start + CHUNK, span.stop))
        total += loss_and_grad(problem, theta, *rows(index), grad=False)[0] * len(index)
    return total / max(len(span), 1)


class Trainer(Protocol):
    """An engine's Adam iterations on one layer, from round-to-nearest (``problem.initial()``)."""

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """The loss of the current iterate on rows ``x`` [G, B, K], ``y`` [B, M]; then one Adam step
        (``LEARNING_RATES`` units) and ``clamp``."""
        ...

    def theta(self) -> Params:
        """A copy of the current iterate, in normalized units."""
        ...


class NumpyTrainer:
    """The numpy engine: ``loss_and_grad``'s hand-derived gradients and ``Adam``."""

    def __init__(self, problem: LayerProblem, lr: dict[str, float]):
        self.problem, self.current = problem, problem.initial()
        self.adam, self.learning = Adam(self.current, lr), problem.learning()

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        loss, grads = loss_and_grad(self.problem, self.current, x, y)
        self.adam.step(self.current, grads, self.learning)
        clamp(self.problem, self.current)
        return loss

    def theta(self) -> Params:
        return copy(self.current)


def step_bounds(problem: LayerProblem) -> dict[str, tuple[float, float]]:
    """Bounds of the relative steps after every Adam step: a weight step stays positive, and the input
    step stays where the activation's bound can still hold its whole grid."""
    return {"w_scale": (1e-3, np.inf), "x_scale": (1e-3, problem.x_step_max / (problem.x_step or 1.0))}


def clamp(problem: LayerProblem, theta: Params) -> None:
    """Clip the relative steps of ``theta`` into ``step_bounds`` (in place)."""
    for name, (lo, hi) in step_bounds(problem).items():
        theta[name] = np.clip(theta[name], lo, hi)


def fit(problem: LayerProblem, rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], count: int,
        settings: Settings, seed: int, trainer: Trainer | None = None) -> Fit:
    """Adam on minibatches drawn (seeded) from the ``count`` cached rows (see ``Settings``), by
    ``trainer`` (default: ``NumpyTrainer``). The draws, the probe and the choice of the iterate kept do
    not depend on the engine."""
    rng = np.random.default_rng(seed)
    trainer = trainer or NumpyTrainer(problem, settings.lr)
    theta = problem.initial()
    width = problem.groups * problem.weight.shape[1]
    batch = int(np.clip(settings.elements // width, min(16, settings.batch), settings.batch))
    judged = held_rows(count, settings.holdout)
    train = judged.start if judged.start > 0 else count
    probe = rows(judged.start + np.sort(rng.choice(len(judged), min(settings.probe, 8 * batch, len(judged)),
                                                   replace=False)))
    best, best_loss = theta, loss_and_grad(problem, theta, *probe, grad=False)[0]
    history = []
    for it in range(1, settings.iterations + 1):
        index = np.sort(rng.choice(train, min(batch, train), replace=False))
        history.append(trainer.step(*rows(index)))
        if it % settings.check == 0 or it == settings.iterations:
            theta = trainer.theta()
            probed = loss_and_grad(problem, theta, *probe, grad=False)[0]
            if probed < best_loss:
                best, best_loss = theta, probed
    start = problem.initial()
    rtn = full_loss(problem, start, rows, judged)
    final = full_loss(problem, best, rows, judged)
    if not final < rtn:
        best, final = start, rtn
    return Fit(best, rtn, final, history, settings.iterations, count)


def copy(theta: Params) -> Params:
    return {k: v.copy() for k, v in theta.items()}
