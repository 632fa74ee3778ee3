"""BN re-estimation: re-standardize each BN-folded layer's quantized output to its fp32 statistics.

Quantization changes the per-channel mean and spread of a layer's output y (before any absorbed
Relu/Clip). For a layer that absorbed a BatchNormalization, measure y_q's per-channel mean m_q and std
σ_q over the whole calibration set (exact averages, not CalibTIP's momentum-0.1 EMA) and map it to
the target (m_t, σ_t) with y' = a·y_q + c, a = σ_t/σ_q, c = m_t − a·m_q. Because y_q = s_x·s_w,c·Σ q_x·q_w
+ b_c is linear in the per-channel weight scale, the map folds exactly into the plan:

    s_w,c ← a_c·s_w,c,   W_c ← q_c·s_w,c (the same codes q_c),   b_c ← a_c·b_c + c_c

so no weight code changes: pair-safe codes stay pair-safe on ``int16_pairs`` targets (checked).

Targets (``target``):
* ``fp32`` — the fp32 layer output's measured per-channel mean and std on the same calibration data;
* ``bn``   — the folded BN's own statistics: mean β and std |γ|·√(σ²/(σ²+ε)) (the std of
  γ·(x − μ)/√(σ² + ε) + β when x has the running mean μ and variance σ²), as CalibTIP.

Layers (``layers``): ``bn``, those that absorbed a BatchNormalization during fusion; or ``hidden``,
every layer whose output reaches another weighted layer (target fp32 only), for models exported with
their BatchNorms already folded, where the fp32 statistics are just as available. Output layers are
left out: on EfficientNet-Lite0 (W8A8) also re-standardizing the logits Gemm raised the mean KL to
fp32 from 0.0099 to 0.0127. Layers are re-standardized in depth order, each on its quantized,
already-corrected prefix (``layer_moments.in_depth_order``). Blocked (int4 MatMulNBits) grids are
left as is. The re-standardization is kept only if it brings the model's outputs nearer fp32 on the
calibration set (``passes/kept.py``; ``keep=always`` keeps it regardless).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxptq.errors import InputError
from onnxptq.kernels.moments import ChannelMoments, standardizing_scale
from onnxptq.kernels.quant import broadcast_channel, dequantize, quantize
from onnxptq.passes.bias_correction import give_bias
from onnxptq.passes.kept import check_keep, kept_if_nearer
from onnxptq.passes.layer_moments import fp32_moments, hidden_layers, in_depth_order
from onnxptq.plan import FoldedBN, LayerPlan
from onnxptq.state import CompileState

TARGETS = ("fp32", "bn")
# Channels whose spread is below this fraction of the layer's (pooled target std) are treated as
# constant: dead channels whose fp32 and quantized stds are both float32 rounding noise, where a ratio
# of noise re-scaled their weights arbitrarily (on EfficientNet-Lite0 by up to 2×, moving the W8A8 mean
# KL between 0.008 and 0.011 with the rounding of the statistics).
CONSTANT = 1e-4


def bn_targets(bn: FoldedBN) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean β and std |γ|·√(σ²/(σ²+ε)) of the folded BatchNormalization's output."""
    var = bn.var.astype(np.float64)
    return bn.beta.astype(np.float64), np.abs(bn.gamma.astype(np.float64)) * np.sqrt(var / (var + bn.epsilon))


def weight_codes(layer: LayerPlan) -> np.ndarray:
    """The codes emission writes for a per-channel grid: clip(rint(W / s_w), low, qmax)."""
    grid = layer.grid
    return quantize(layer.weight, broadcast_channel(grid.scale, grid.axis, layer.weight.ndim), 0, grid.low, grid.qmax)


def rescale_layer(layer: LayerPlan, a: np.ndarray, c: np.ndarray) -> None:
    """Fold y' = a·y + c per output channel into ``layer``'s weight scale, weight and bias, keeping its codes."""
    grid = layer.grid
    codes = weight_codes(layer)
    grid.scale = (grid.scale * a).astype(np.float32)
    layer.weight = dequantize(codes, broadcast_channel(grid.scale, grid.axis, layer.weight.ndim), 0)
    layer.bias = (a * layer.bias + c).astype(np.float32)
    # The int16-pair safety of the weights pass (and any solver's choice of codes) rests on the codes.
    assert np.array_equal(weight_codes(layer), codes), f"{layer.node}: re-scaling changed weight codes"


@dataclass
class BNReestimatePass:
    """``target``: fp32 or bn; ``layers``: bn or hidden; ``keep``: nearer or always (module doc)."""

    target: str = "fp32"
    layers: str = "bn"
    keep: str = "nearer"
    name: ClassVar[str] = "bn-reestimate"

    def __post_init__(self) -> None:
        check_keep(self.name, self.keep)
        if self.target not in TARGETS:
            raise InputError(f"bn-reestimate: target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.layers not in ("bn", "hidden"):
            raise InputError(f"bn-reestimate: layers must be bn or hidden; got {self.layers!r}")
        if self.layers == "hidden" and self.target == "bn":
            raise InputError("bn-reestimate: layers=hidden needs target=fp32 (layers without a BatchNormalization "
                             "have no β, γ to aim at)")

    def layers_of(self, state: CompileState) -> list[str]:
        """The layers this pass re-standardizes, in plan order (a zero bias given where one can be)."""
        if self.layers == "bn":
            chosen = {name for name, layer in state.plan.layers.items() if layer.bn is not None}
        else:
            chosen = hidden_layers(state.model.graph, state.plan.layers)
        return [name for name, layer in state.plan.layers.items()
                if name in chosen and layer.grid.block_size is None and give_bias(state, layer)]

    def targets(self, state: CompileState, layers: list[str], fp32: dict[str, ChannelMoments] | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per layer the (mean, std) its output is mapped to: the fp32 output's, measured on
        ``state.calib`` (or taken from ``fp32``, measured there already), or the folded BN's."""
        if self.target == "bn":
            return {name: bn_targets(state.plan.layers[name].bn) for name in layers}
        fp32 = fp32 or fp32_moments(state, layers)
        return {name: (fp32[name].mean, fp32[name].std) for name in layers}

    @staticmethod
    def restandardize(state: CompileState, layer: LayerPlan, measured: ChannelMoments,
                      target: tuple[np.ndarray, np.ndarray]) -> None:
        """Fold y' = a·y + c into ``layer`` (module doc), mapping its ``measured`` moments to ``target``."""
        mean, std = target
        a = standardizing_scale(measured.std, std, CONSTANT * float(np.sqrt(np.mean(std**2))))
        # A channel whose target spread is ~0 would get a vanishing weight scale and an int32 bias
        # b' ≈ m_t at scale s_x·a·s_w out of range: keep the weights pass's headroom |b'| ≤ 2³⁰·s_x·s_w'.
        s_x = float(state.plan.act_params(layer.input_name)[0])
        a = np.maximum(a, np.abs(mean) / (2.0**30 * s_x * layer.grid.scale.astype(np.float64)))
        rescale_layer(layer, a, mean - a * measured.mean)

    def run(self, state: CompileState) -> None:
        layers = self.layers_of(state)
        if not layers:
            state.report.note(self.name, f"no layers to re-standardize (layers={self.layers}; layers=hidden "
                                         "takes every layer that feeds another)")
            return
        targets = self.targets(state, layers)
        ratios: list[float] = []

        def correct(layer: LayerPlan, measured: ChannelMoments) -> None:
            ratios.extend((measured.std / np.maximum(targets[layer.node][1], 1e-12)).tolist())
            self.restandardize(state, layer, measured, targets[layer.node])

        with kept_if_nearer(state, self.name, layers, self.keep):
            runs = in_depth_order(state, layers, correct, "BN re-estimation")
            p5, p50, p95 = np.percentile(ratios, [5, 50, 95])
            state.report.note(self.name, f"{len(layers)} layers, {runs} runs, target {self.target}; std ratio σ_q/"
                                         f"σ_target per channel before: median {p50:.4g}, 5–95% [{p5:.4g}, {p95:.4g}]")
