"""Layer inputs and outputs of the fp32 model, streamed into per-layer statistics for weight solvers.

The fused fp32 model runs over the calibration batches with every planned layer's input and output
as extra outputs. Each batch is turned, per layer, into rows of the layer's matrix product
y = X·wᵀ (im2col patches for a Conv, flattened leading axes for MatMul/Gemm; the layer's own bias
subtracted from y) and handed to that layer's accumulator, then dropped: memory is one batch's
activations plus the accumulators, whatever the number of samples. A layer with more than
``max_rows`` rows in a batch gets a uniform sample of them (seeded by ``--seed``), each sampled row
weighted by rows/sampled so sums stay unbiased.

Any accumulator with ``update(x [G, R, K], y [R, M], weight)`` can be streamed (``capture``);
``response_stats`` collects the least-squares statistics XᵀX, XᵀY, ‖Y‖² (``kernels/response.py``),
``LayerRows`` keeps the rows themselves in files, read back memory-mapped (``open_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import onnx_ir as ir

from onnxptq import runtime
from onnxptq.graph import attr, const
from onnxptq.kernels.im2col import channels_last_rows, conv_pads, im2col
from onnxptq.kernels.response import ResponseStats
from onnxptq.passes.calibration import with_outputs
from onnxptq.passes.layer_moments import outputs_named
from onnxptq.plan import LayerPlan
from onnxptq.state import CompileState


class Accumulator(Protocol):
    def update(self, x: np.ndarray, y: np.ndarray, weight: float = 1.0) -> None: ...


A = TypeVar("A", bound=Accumulator)


@dataclass(frozen=True)
class LayerIO:
    """A planned layer as a matrix product: its input/output tensors, its bias in the fp32 graph, its
    ``channels`` outputs in ``groups`` groups reading ``k`` inputs each, and for a Conv the geometry of
    its patches (``kernel`` is None for MatMul/Gemm)."""

    node: str
    input: str
    output: str
    groups: int
    k: int
    channels: int
    bias: np.ndarray | None
    kernel: tuple[int, ...] | None = None
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = None
    auto_pad: str = "NOTSET"

    def rows(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
             max_rows: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(X [G, R, K], pre-bias Y [R, M], weight of each row) of one batch, sampling ≤ ``max_rows``."""
        total = y.size // self.channels
        pick = None
        if total > max_rows:
            pick = np.sort(rng.choice(total, max_rows, replace=False))
        if self.kernel is None:
            x_rows = x.reshape(-1, self.k)
            y_rows = y.reshape(-1, self.channels)
            if pick is not None:
                x_rows, y_rows = x_rows[pick], y_rows[pick]
            x_rows = x_rows[None]
        else:
            pads = conv_pads(x.shape[2:], self.kernel, self.strides, self.dilations, self.pads, self.auto_pad)
            x_rows = im2col(x, self.kernel, self.strides, self.dilations, pads, self.groups, pick)
            y_rows = channels_last_rows(y, pick)
        if self.bias is not None:
            y_rows = y_rows - self.bias
        return x_rows, y_rows, total / (len(pick) if pick is not None else total)


class RowFile:
    """Rows of a fixed shape appended to a raw float32 file, read back memory-mapped."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape, self.count = path, shape, 0
        self.file = open(path, "wb")

    def append(self, rows: np.ndarray) -> None:
        np.ascontiguousarray(rows, np.float32).tofile(self.file)
        self.count += len(rows)

    def close(self) -> tuple[str, tuple[int, ...]]:
        """(path, shape) of the finished file: what ``open_rows`` maps."""
        self.file.close()
        return str(self.path), (self.count, *self.shape)


class LayerRows:
    """Accumulator for ``capture``: a layer's X rows as [R, G, K] and Y rows [R, M] on disk (either
    may be skipped: sequential mode takes Y from the fp32 capture and X from the quantized one)."""

    def __init__(self, stem: Path, io: LayerIO, x: bool, y: bool):
        self.x = RowFile(stem.with_suffix(".x"), (io.groups, io.k)) if x else None
        self.y = RowFile(stem.with_suffix(".y"), (io.channels,)) if y else None

    def update(self, x: np.ndarray, y: np.ndarray, weight: float = 1.0) -> None:
        if self.x is not None:
            self.x.append(x.transpose(1, 0, 2))
        if self.y is not None:
            self.y.append(y)


def layer_io(node: ir.Node, layer: LayerPlan) -> LayerIO:
    """The ``LayerIO`` of ``layer`` read from its fp32 graph ``node``."""
    bias_v = node.inputs[2] if len(node.inputs) > 2 else None
    bias = None if bias_v is None else const(bias_v).astype(np.float32)
    channels = layer.channels
    k = layer.weight.size // channels
    common = dict(node=node.name, input=node.inputs[0].name, output=node.outputs[0].name, k=k,
                  channels=channels, bias=bias)
    if layer.op_type != "Conv":
        return LayerIO(groups=1, **common)
    rank = layer.weight.ndim - 2
    return LayerIO(groups=attr(node, "group", 1), kernel=tuple(layer.weight.shape[2:]),
                   strides=tuple(attr(node, "strides", [1] * rank)),
                   dilations=tuple(attr(node, "dilations", [1] * rank)),
                   pads=None if attr(node, "pads") is None else tuple(attr(node, "pads")),
                   auto_pad=attr(node, "auto_pad", "NOTSET"), **common)


def capture(state: CompileState, layers: list[LayerPlan], make: Callable[[LayerIO], A],
            max_rows: int = 4096, description: str = "capture", source: ir.Model | None = None,
            level: str = "basic", inputs_from: dict[str, str] | None = None,
            observe: tuple[list[str], Callable[[int, list[np.ndarray]], None]] | None = None) -> dict[str, A]:
    """Run the fused fp32 model (or ``source``, a model with the same tensor names, such as the QDQ
    model of the plan, at optimization ``level``) over the calibration batches and stream every
    layer's (X, Y) rows into its accumulator ``make(io)``; returns node name → accumulator.
    ``inputs_from`` maps a layer input's name to the tensor of ``source`` to read X from instead.
    ``observe`` = (names, f): f(b, tensors) gets the named tensors of every batch b from the same run.

    The rows sampled from batch b of layer l depend only on (seed, b, l's position in the plan), so
    two captures from different models pick the same rows (inputs from one, targets from the other)."""
    nodes = {n.name: n for n in state.model.graph}
    ios = [layer_io(nodes[layer.node], layer) for layer in layers]
    accumulators = {io.node: make(io) for io in ios}
    graph_inputs = {v.name for v in state.model.graph.inputs}
    finals, observer = observe if observe is not None else ([], None)
    read = {io.input: (inputs_from or {}).get(io.input, io.input) for io in ios}
    names = list(dict.fromkeys([*(n for io in ios for n in (read[io.input], io.output) if n not in graph_inputs),
                                *finals]))
    model = with_outputs(state.model, names) if source is None else outputs_named(source, names)
    sess = runtime.session(model, threads=state.options.threads, level=level)
    order = {name: i for i, name in enumerate(state.plan.layers)}
    batch = state.options.batch_size
    batches = state.calib.batches(batch)
    for b, feed in enumerate(state.progress.track(batches, description, -(-len(state.calib) // batch))):
        tensors = {**feed, **dict(zip(names, sess.run(names, feed)))}
        if observer is not None:
            observer(b, [tensors[name] for name in finals])
        for io in ios:
            rng = np.random.default_rng([state.options.seed, b, order[io.node]])
            accumulators[io.node].update(*io.rows(tensors[read[io.input]], tensors[io.output], rng, max_rows))
    return accumulators


def response_stats(state: CompileState, layers: list[LayerPlan], max_rows: int = 4096) -> dict[str, ResponseStats]:
    """Per layer, A = XᵀX per group, XᵀY and ‖Y‖² over the calibration set (see ``capture``)."""
    return capture(state, layers, lambda io: ResponseStats(io.groups, io.k, io.channels), max_rows,
                   "capture: layer responses")
