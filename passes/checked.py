"""Write a weight solver's result into the plan only where the layer as written beats what it held.

A solver fits a layer in its own terms, but the plan receives the fit through the floors emission
needs — bias-safe weight scales (the int32 bias at s_x·s_w), pair-safe scales for 8-bit grids on
targets that sum u8×s8 products in saturating int16 pairs, emission's clip(rint(w/s_w)) — and these
can undo part of a fit (AdaQuant on EfficientNet-Lite0's 8-bit stem ended at 3× round-to-nearest's
loss after the pair-safe floor). ``write_if_better`` writes, measures the solver's loss of the layer
as the plan now holds it, and puts the layer's previous entries back unless that loss is strictly
below the loss of the previous entries (round-to-nearest, as the weights pass left them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from onnxptq.plan import LayerPlan
from onnxptq.state import CompileState


class Checked(NamedTuple):
    """The loss of the layer before the write and as written, and whether the write was kept."""

    before: float
    written: float
    kept: bool

    @property
    def loss(self) -> float:
        """The loss of what the plan holds."""
        return self.written if self.kept else self.before


def write_if_better(state: CompileState, layer: LayerPlan, write: Callable[[], None], loss: Callable[[], float],
                    before: float | None = None) -> Checked:
    """Run ``write()`` (which may replace the layer's weight, bias and grid scale arrays and its input
    grid's range), then keep it only if ``loss()`` of the written layer is below ``before`` (by default
    ``loss()`` of the layer before the write)."""
    restore = snapshot(state, layer)
    if before is None:
        before = loss()
    write()
    written = loss()
    if written < before:
        return Checked(before, written, True)
    restore()
    return Checked(before, written, False)


def snapshot(state: CompileState, layer: LayerPlan) -> Callable[[], None]:
    """A function that puts back the layer's current weight, bias and grid scale arrays and its input
    grid's range (writers replace these arrays, they do not change them in place)."""
    root = state.plan.root(layer.input_name) if layer.activation_input else None
    saved = (layer.weight, layer.bias, layer.grid.scale, None if root is None else (root.lo, root.hi))

    def restore() -> None:
        layer.weight, layer.bias, layer.grid.scale, bounds = saved
        if root is not None:
            root.lo, root.hi = bounds

    return restore
