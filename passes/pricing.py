"""A layer priced as the corrections will leave it: its ΔL on the sensitivity probe
(``passes/sensitivity.py``), re-standardized where the pipeline's BN re-estimation will re-standardize
it. Mixed precision prices every candidate so; the BitSplit solver judges each written layer so
against round to nearest.

BN re-estimation maps a hidden layer's per-channel output moments to fp32's, y' = a·y + c, and
repairs much of what rounding costs; a layer measured without it looks worse than the corrected model
will be (PP-OCRv4's Convs at 4 bits: ΔL ≈ 0.9 raw for some, while uniform 4-bit corrected reaches CER
0.037). Re-standardized here means: as BN re-estimation would leave the layer were it the only
quantized one — its output's moments measured on the probe (which observes the layer), mapped to the
fp32 moments on the same subset. A layer with a bias that BN re-estimation leaves alone (the last ones,
a classifier) is priced with its bias corrected where the pipeline's bias correction will correct it:
shifted so its output's mean on the subset is fp32's (``bias_corrected``). Priced raw, EfficientNet-Lite0's
classifier at 2 bits cost ΔL 0.137; bias-corrected it is cheap, and at ``--size-ratio 0.13`` (float16
block scales) the program's mix went from 6 Convs at 2 bits (fp32 top-1 agreement 0.435, mean KL 0.782)
to the classifier at 2 bits (0.646, 0.270).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxptq.data import CalibrationSet
from onnxptq.passes.bias_correction import BiasCorrectionPass, give_bias
from onnxptq.passes.bn_reestimate import BNReestimatePass
from onnxptq.passes.layer_moments import fp32_moments
from onnxptq.passes.sensitivity import Change, InputGrid, Probe, Reference, build_probe, layer_change
from onnxptq.plan import LayerPlan, TablePlan
from onnxptq.state import CompileState


def restandardized(state: CompileState, probe: Probe, layer: LayerPlan, target: tuple[np.ndarray, np.ndarray],
                   input_grid: InputGrid | None = None) -> LayerPlan:
    """A copy of ``layer`` as BN re-estimation would leave it were it the only quantized layer: its
    output's per-channel moments measured on ``probe`` (which observes it; the input on ``input_grid``
    if given), mapped to ``target``."""
    copy = layer.copy()
    BNReestimatePass.restandardize(state, copy, probe.output_moments(copy, input_grid), target)
    return copy


def bias_corrected(probe: Probe, layer: LayerPlan, mean: np.ndarray,
                   input_grid: InputGrid | None = None) -> LayerPlan:
    """A copy of ``layer`` as bias correction would leave it were it the only quantized layer: its
    bias shifted by the fp32 output ``mean`` minus its output's mean measured on ``probe``."""
    copy = layer.copy()
    copy.bias = (copy.bias - (probe.output_moments(copy, input_grid).mean - mean)).astype(np.float32)
    return copy


class LayerPricer:
    """Per-layer probes over ``data`` (whose fp32 outputs ``ref`` holds), and each layer's change as
    the corrections leave it: re-standardized to the fp32 moments on the same ``data``, or its bias
    corrected to the fp32 mean there (``targets``, ``means``).

    Built on ``state.plan`` as it is (the layers the pipeline's BN re-estimation or bias correction
    takes are given a zero bias where they can take one, as those passes do)."""

    def __init__(self, state: CompileState, ref: Reference, data: CalibrationSet):
        bn = next((p for p in state.corrections if isinstance(p, BNReestimatePass)), None)
        corrected = bn.layers_of(state) if bn is not None else []
        bias = any(isinstance(p, BiasCorrectionPass) for p in state.corrections)
        shifted = [name for name, layer in state.plan.layers.items()
                   if bias and name not in corrected and give_bias(state, layer)]
        on_data = dataclasses.replace(state, calib=data)
        # the fp32 moments both corrections need, in one run
        measured = (list(corrected) if bn is not None and bn.target == "fp32" else []) + shifted
        fp32 = fp32_moments(on_data, measured) if measured else {}
        self.targets = bn.targets(on_data, corrected, fp32) if corrected else {}
        self.means = {name: fp32[name].mean for name in shifted}
        self.state, self.ref = state, ref

    def probe(self, name: str) -> Probe:
        """The probe in which layer (or table) ``name`` is variable, observing it if it is corrected."""
        return build_probe(self.state.model, self.state.plan, [name], self.ref, self.state.options.threads,
                           observe=[name] if name in self.targets or name in self.means else [])

    def change(self, probe: Probe, layer: LayerPlan | TablePlan, input_grid: InputGrid | None = None) -> Change:
        """What ``probe`` (from ``probe(layer.node)``) changes for ``layer`` as the corrections leave it,
        its input on ``input_grid`` (None: the plan's)."""
        if layer.node in self.targets and layer.grid.block_size is None:  # blocked grids are left as is
            layer = restandardized(self.state, probe, layer, self.targets[layer.node], input_grid)
        elif layer.node in self.means:
            layer = bias_corrected(probe, layer, self.means[layer.node], input_grid)
        return layer_change(layer)._replace(input_grid=input_grid)
