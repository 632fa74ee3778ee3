"""A layer priced as the corrections will leave it: its ΔL on the sensitivity probe
(``passes/sensitivity.py``), re-standardized where the pipeline's BN re-estimation will re-standardize
it. Mixed precision prices every candidate so; the BitSplit solver judges each written layer so
against round to nearest.

BN re-estimation maps a hidden layer's per-channel output moments to fp32's, y' = a·y + c, and
repairs much of what rounding costs; a layer measured without it looks worse than the corrected model
will be (PP-OCRv4's Convs at 4 bits: ΔL ≈ 0.9 raw for some, while uniform 4-bit corrected reaches CER
0.037). Re-standardized here means: as BN re-estimation would leave the layer were it the only
quantized one — its output's moments measured on the probe (which observes the layer), mapped to the
fp32 moments on the same subset.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxptq.data import CalibrationSet
from onnxptq.passes.bn_reestimate import BNReestimatePass
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


class LayerPricer:
    """Per-layer probes over ``data`` (whose fp32 outputs ``ref`` holds), and each layer's change as
    the corrections leave it: re-standardized to the fp32 moments on the same ``data``.

    Built on ``state.plan`` as it is (the layers the pipeline's BN re-estimation takes are given a zero
    bias where they can take one, as that pass does)."""

    def __init__(self, state: CompileState, ref: Reference, data: CalibrationSet):
        bn = next((p for p in state.corrections if isinstance(p, BNReestimatePass)), None)
        corrected = bn.layers_of(state) if bn is not None else []
        self.targets = bn.targets(dataclasses.replace(state, calib=data), corrected) if corrected else {}
        self.state, self.ref = state, ref

    def probe(self, name: str) -> Probe:
        """The probe in which layer (or table) ``name`` is variable, observing it if it is re-standardized."""
        return build_probe(self.state.model, self.state.plan, [name], self.ref, self.state.options.threads,
                           observe=[name] if name in self.targets else [])

    def change(self, probe: Probe, layer: LayerPlan | TablePlan, input_grid: InputGrid | None = None) -> Change:
        """What ``probe`` (from ``probe(layer.node)``) changes for ``layer`` as the corrections leave it,
        its input on ``input_grid`` (None: the plan's)."""
        if layer.node in self.targets and layer.grid.block_size is None:  # blocked grids are left as is
            layer = restandardized(self.state, probe, layer, self.targets[layer.node], input_grid)
        return layer_change(layer)._replace(input_grid=input_grid)
