"""Weight grids by round-to-nearest: the per-channel (or per-block) scale of every planned layer.

``minmax`` takes s_c = max|W_c| / qmax; ``mse`` searches s_c = r·max|W_c|/qmax, r ∈ [0.5, 1] from 4 bits
up and [0.1, 1] at 2 and 3 bits (``kernels.quant.clip_floor``), for the least ‖W_c − ŵ_c‖². Scales are
then floored so the int32 bias stays representable, and on targets whose kernels sum u8×s8 products in
saturating int16 pairs (``ort-cpu-avx2``) raised to the least value whose codes are pair-safe
(``kernels/saturation.py``). Both only raise s_c. Later solvers (AdaQuant, BitSplit) start from these
grids.
"""

from __future__ import annotations

import numpy as np

from onnxptq.errors import InputError
from onnxptq.graph import attr
from onnxptq.kernels.quant import block_rows, channel_rows, row_scales
from onnxptq.kernels.saturation import pair_safe_scales, reduction_rows
from onnxptq.plan import LayerPlan
from onnxptq.state import CompileState
from onnxptq.target import resolve_target


class WeightGridPass:
    name = "weights"

    def run(self, state: CompileState) -> None:
        method = state.options.weight_method
        if method not in ("minmax", "mse"):
            raise InputError(f"unknown --weight-method {method!r}; choose minmax or mse")
        int16_pairs = resolve_target(state.options.target).int16_pairs
        groups = {n.name: attr(n, "group", 1) for n in state.model.graph}
        raised = 0
        for layer in state.progress.track(state.plan.layers.values(), "weight grids", len(state.plan.layers)):
            raised += self.fit(state, layer, method, int16_pairs, groups[layer.node])
        pairs = f"; {raised} channel scales raised to be int16-pair-safe" if int16_pairs else ""
        state.report.note(self.name, f"{len(state.plan.layers)} layers, {method} scales{pairs}")

    @classmethod
    def fit(cls, state: CompileState, layer: LayerPlan, method: str, int16_pairs: bool, group: int) -> int:
        """Set ``layer.grid.scale``; returns how many channel scales were raised to be pair-safe."""
        grid = layer.grid
        if grid.block_size:
            w_kn = layer.weight if grid.axis == 0 else layer.weight.T
            nb = -(-w_kn.shape[0] // grid.block_size)
            scale = row_scales(block_rows(w_kn, grid.block_size), grid.qmax, method)
            grid.scale = scale.reshape(nb, w_kn.shape[1])
            return 0
        scale = cls._bias_safe(state, layer, row_scales(channel_rows(layer.weight, grid.axis), grid.qmax, method))
        grid.scale = cls._pair_safe(layer, scale, group) if int16_pairs else scale
        return int((grid.scale > scale).sum())

    @staticmethod
    def _pair_safe(layer: LayerPlan, scale: np.ndarray, group: int) -> np.ndarray:
        """The least scales ≥ ``scale`` whose codes no u8 activation can saturate in the layer's kernel
        (unchanged where that kernel accumulates in int32, i.e. depthwise Conv)."""
        rows = reduction_rows(layer.weight, layer.op_type, layer.grid.axis, group)
        return scale if rows is None else pair_safe_scales(rows, scale, layer.grid.qmax)

    @staticmethod
    def _bias_safe(state: CompileState, layer: LayerPlan, scale: np.ndarray) -> np.ndarray:
        """Raise s_w where the bias could not be stored as int32 at scale s_x·s_w.

        Channels with (near-)zero weights get tiny scales; then b / (s_x·s_w) overflows int32, or
        s_x·s_w underflows float32. Flooring s_w at |b| / (s_x·2³⁰) and 1e-30 / s_x costs nothing on
        such channels (their weights quantize to 0 either way).
        """
        if layer.bias is None or not layer.activation_input:
            return scale
        s_x = float(state.plan.act_params(layer.input_name)[0])
        floor = np.maximum(np.abs(layer.bias.astype(np.float64)) / (s_x * 2.0**30), 1e-30 / s_x)
        return np.maximum(scale, floor).astype(np.float32)
