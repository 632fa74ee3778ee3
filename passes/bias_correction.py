"""Bias correction: remove each layer's expected output error per channel, in closed form (no backprop).

Quantizing a layer's weights and input shifts its mean output: for y = W·x + b, the quantized layer
gives E[y_q − y] = E[Ŵ·x̂] − E[W·x], in general non-zero per output channel c. The pass sets

    b_c ← b_c − (E[y_q,c] − E[y_c])

with both expectations the exact averages over the calibration set, so the quantized layer's mean
output equals the fp32 one (up to emission's int32 bias step s_x·s_w,c). y is the layer node's own
output: the pre-activation where a Relu/Clip is absorbed, which the bias moves linearly (the clipped
output would not be). A mean of differences is the difference of means, so the fp32 means are measured
once and only the quantized model is re-run, in depth order (``layer_moments.in_depth_order``).

Conv and Gemm without a bias get a zero one in the working graph first; MatMul has no bias input and
is left as is. The correction is kept only if it brings the model's outputs nearer fp32 on the
calibration set (``passes/kept.py``; ``keep=always`` keeps it regardless).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxptq.graph import attr, set_const
from onnxptq.kernels.moments import ChannelMoments
from onnxptq.passes.kept import check_keep, kept_if_nearer
from onnxptq.passes.layer_moments import fp32_moments, in_depth_order
from onnxptq.plan import LayerPlan
from onnxptq.state import CompileState


def give_bias(state: CompileState, layer: LayerPlan) -> bool:
    """Ensure ``layer`` has a bias (a zero one added to the graph if it can take one); whether it has."""
    if layer.bias is not None:
        return True
    node = next(n for n in state.model.graph if n.name == layer.node)
    if layer.op_type not in ("Conv", "Gemm") or attr(node, "beta", 1.0) != 1.0:
        return False
    zeros = np.zeros(layer.channels, np.float32)
    value = set_const(state.model.graph, node, 2, zeros, f"{layer.node}_bias")
    layer.bias_name, layer.bias = value.name, zeros.copy()
    return True


@dataclass
class BiasCorrectionPass:
    """``keep``: nearer (only where the outputs move nearer fp32) or always."""

    keep: str = "nearer"
    name: ClassVar[str] = "bias-correction"

    def __post_init__(self) -> None:
        check_keep(self.name, self.keep)

    def run(self, state: CompileState) -> None:
        layers = [name for name, layer in state.plan.layers.items() if give_bias(state, layer)]
        if not layers:
            state.report.note(self.name, "no layer has or can take a bias; nothing to correct")
            return
        reference = fp32_moments(state, layers)
        shifts: list[float] = []

        def correct(layer: LayerPlan, measured: ChannelMoments) -> None:
            ref = reference[layer.node]
            shift = measured.mean - ref.mean
            layer.bias = (layer.bias - shift).astype(np.float32)
            # relative to the layer's pooled std: dead channels (σ_c ≈ 0) would swamp a per-channel ratio
            shifts.extend((np.abs(shift) / max(float(np.sqrt(ref.var.mean())), 1e-12)).tolist())

        with kept_if_nearer(state, self.name, layers, self.keep):
            runs = in_depth_order(state, layers, correct, "bias correction")
            skipped = len(state.plan.layers) - len(layers)
            rel = np.asarray(shifts) if shifts else np.zeros(1)
            state.report.note(self.name, f"{len(layers)} layers, {runs} runs; mean output error removed |E[y_q − y]|"
                                         f"/σ_layer per channel: median {np.median(rel):.3g}, max {rel.max():.3g}"
                                         + (f"; {skipped} layers without a bias input left as is" if skipped else ""))
