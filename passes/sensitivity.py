"""Layer sensitivity ΔL(l, c): how far the model's outputs move from fp32 when only layer l is quantized.

What is measured: the fused fp32 graph in which layer l's weight is replaced by ŵ = q·s, the exact
values emission's codes stand for at candidate c (pair-safe where the target needs it), and its input
x by the Q/DQ value of x on the calibrated grid (unless c reads a float input, as int4 MatMulNBits
does); every other layer stays fp32. A lookup table (``plan.tables``) is measured the same way, its
values replaced by T̂ (it has no input to quantize). ΔL is the distance of the outputs to the fp32 outputs on the first
``SAMPLES`` calibration samples (a fixed subset, so every candidate is measured on the same inputs),
summed over the float outputs:

* class scores — an output computed by Softmax/LogSoftmax (probabilities) or by a Gemm/MatMul
  (logits): the mean over positions of KL(p_fp32 ‖ p);
* any other output: 1 − cosine, per sample, averaged.

Measured against fp32 rather than against the all-8-bit model, so "keep float" costs exactly 0 and
no run, and ΔL(l, c) contains no interaction with the other layers' rounding — which is what the
integer program's additivity assumes; ``Probe.distance`` with every chosen candidate at once measures
how far that assumption holds.

The corrections that run after the program change a layer too: BN re-estimation maps each hidden
layer's per-channel output moments to fp32's, y' = a·y + c, and repairs much of what rounding costs
(``passes/mixed.py`` measures such layers corrected). For that a probe can *observe* a layer — its
output is also a graph output — and takes a bias along with the weight (``Change``): one run gives the
quantized layer's output moments over the subset, a second the outputs with a·ŵ and a·b + c.

How, cheaply: no emission and no integer kernels, one probe model per layer. In layer l's probe its
weight is a graph input and its input x becomes x + m·(DQ(Q(x)) − x) with a scalar input m ∈ {0, 1}
and the grid's scale, zero point and code cap inputs too (a 4-bit input candidate is another grid);
every other weight stays a constant, so onnxruntime pre-packs those layers as in the fp32 model. Each
candidate of l is then one run over the subset (in one batch where the model's batch axis is free)
with two inputs set, in one session. A probe with every layer variable (``build_probe`` with all
names) is as exact but runs ≈ 3× slower than the fp32 model (EfficientNet-Lite0), as no weight can be
pre-packed: it serves the one joint run of the additivity check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxptq import runtime
from onnxptq.data import CalibrationSet
from onnxptq.kernels.moments import ChannelMoments
from onnxptq.metrics import cosine, mean_kl
from onnxptq.passes.calibration import with_outputs
from onnxptq.passes.layer_moments import output_channel_axis
from onnxptq.plan import ActivationPlan, LayerPlan, QuantPlan, TablePlan

SAMPLES = 16  # calibration samples ΔL is measured on (the first ones; all if fewer): ≈ 1 s per
# candidate on EfficientNet-Lite0 on a loaded 2-core host
CLASS_SCORES = {"Softmax": True, "LogSoftmax": False, "Gemm": False, "MatMul": False}  # op → probabilities?


def subset(calib: CalibrationSet, samples: int = SAMPLES) -> CalibrationSet:
    """The first ``samples`` samples of ``calib``."""
    return calib.split(len(calib) - samples)[0] if len(calib) > samples else calib


class InputGrid(NamedTuple):
    """A layer input's uint8 grid as the integer kernel reads it: scale s, zero point z and the largest
    code Q (255, or 15 for a 4-bit grid on int8 kernels, whose codes emission caps)."""

    scale: np.float32
    zero_point: int
    qmax: int

    @classmethod
    def of(cls, act: ActivationPlan) -> "InputGrid":
        scale, zero_point = act.params()
        return cls(np.float32(scale), int(zero_point), act.qmax)

    def feeds(self, prefix: str) -> dict[str, np.ndarray]:
        """The probe inputs of this grid for the input path named ``prefix`` (``_fake_quantized_input``)."""
        s, z = np.float32(self.scale), self.zero_point
        return {f"{prefix}.scale": np.array(s, np.float32), f"{prefix}.zero_point": np.array(z, np.uint8),
                f"{prefix}.lo": np.array(-z * s, np.float32), f"{prefix}.hi": np.array((self.qmax - z) * s, np.float32)}


def _fake_quantized_input(graph: ir.Graph, node: ir.Node) -> str:
    """Route ``node``'s input x through x + m·(DQ(Q(clip(x, lo, hi))) − x), with the switch m and the
    grid (``InputGrid.feeds``: scale, zero point and the clip [−z·s, (Q − z)·s] that caps the codes at
    Q) as graph inputs; returns the path's name prefix (m is ``prefix.mask``)."""
    x = node.inputs[0]
    prefix = f"{node.name}.probe"

    def scalar(role: str, dtype: ir.DataType) -> ir.Value:
        v = ir.Value(name=f"{prefix}.{role}", type=ir.TensorType(dtype), shape=ir.Shape([]))
        graph.inputs.append(v)
        return v

    mask, s, z = scalar("mask", ir.DataType.FLOAT), scalar("scale", ir.DataType.FLOAT), \
        scalar("zero_point", ir.DataType.UINT8)
    clip = ir.node("Clip", [x, scalar("lo", ir.DataType.FLOAT), scalar("hi", ir.DataType.FLOAT)], name=f"{prefix}.clip")
    q = ir.node("QuantizeLinear", [clip.outputs[0], s, z], name=f"{prefix}.q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{prefix}.dq")
    error = ir.node("Sub", [dq.outputs[0], x], name=f"{prefix}.error")
    gated = ir.node("Mul", [error.outputs[0], mask], name=f"{prefix}.gated")
    out = ir.node("Add", [x, gated.outputs[0]], name=f"{prefix}.input")
    for n in (clip, q, dq, error, gated, out):
        n.outputs[0].name = n.name
    graph.insert_before(node, [clip, q, dq, error, gated, out])
    node.replace_input_with(0, out.outputs[0])
    return prefix


class Change(NamedTuple):
    """A layer as a probe runs it: weight ŵ (a table's T̂), whether its input is quantized, its bias
    (None: the fp32 model's) and its input grid (None: the plan's)."""

    weight: np.ndarray
    quantize_input: bool
    bias: np.ndarray | None = None
    input_grid: InputGrid | None = None


@dataclass
class Probe:
    """A probe session over a fixed sample subset, with the fp32 reference outputs.

    ``weights``/``biases``/``inputs``: layer → input name of its weight / of its bias (where it has
    one) / the name prefix of its input-quantization path (none when the input is not quantized in
    the plan);
    ``observed``: layer → its output, also a graph output.
    """

    session: object
    feeds: list[dict[str, np.ndarray]]
    base: dict[str, np.ndarray]
    weights: dict[str, str]
    biases: dict[str, str]
    inputs: dict[str, str]
    reference: "Reference"
    observed: dict[str, str] = field(default_factory=dict)  # layer → name of its output, where observed

    def run(self, layers: dict[str, Change], also: Sequence[str] = ()) -> list[np.ndarray]:
        """The float outputs over the subset with each named layer changed (``Change``); then the
        values named in ``also`` (``build_probe``'s ``observe``)."""
        changed = {}
        for name, change in layers.items():
            changed[self.weights[name]] = change.weight
            if change.bias is not None:
                changed[self.biases[name]] = change.bias
            if name in self.inputs:
                changed[f"{self.inputs[name]}.mask"] = np.array(1.0 if change.quantize_input else 0.0, np.float32)
                if change.input_grid is not None:
                    changed.update(change.input_grid.feeds(self.inputs[name]))
        names = [*self.reference.names, *also]
        return run_batches(self.session, names, [{**feed, **self.base, **changed} for feed in self.feeds])

    def output_moments(self, layer: LayerPlan, input_grid: InputGrid | None = None) -> ChannelMoments:
        """Per-channel moments over the subset of ``layer``'s output (observed) with it changed as planned
        (its input on ``input_grid``, if given)."""
        moments = ChannelMoments(output_channel_axis(layer))
        change = layer_change(layer)._replace(input_grid=input_grid)
        moments.update(self.run({layer.node: change}, [self.observed[layer.node]])[-1])
        return moments

    def distance(self, layers: dict[str, Change]) -> float:
        """Σ over outputs of the distance to fp32 (module doc) with ``layers`` changed as in ``run``."""
        return output_distance(self.reference.outputs, self.run(layers), self.reference.normalized)


def run_batches(session: object, names: Sequence[str], feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The values ``names`` of an onnxruntime ``session`` over every feed, each joined along the batch axis."""
    chunks = [session.run(list(names), feed) for feed in feeds]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(names))]


def output_distance(refs: list[np.ndarray], tests: list[np.ndarray], normalized: list[bool | None]) -> float:
    """Σ over outputs of the distance of ``tests`` to the fp32 ``refs``: mean KL(p_fp32 ‖ p) for class
    scores (``normalized``: True probabilities, False logits), else 1 − cosine averaged over samples."""
    return sum(1.0 - cosine(ref, test) if kind is None else mean_kl(ref, test, kind)
               for ref, test, kind in zip(refs, tests, normalized))


def float_outputs(model: ir.Model) -> tuple[list[str], list[bool | None]]:
    """The names of ``model``'s float outputs and what each holds: True probabilities (Softmax), False
    logits (Gemm/MatMul), None not class scores."""
    values = [v for v in model.graph.outputs if v.dtype == ir.DataType.FLOAT]
    return [v.name for v in values], [None if v.producer() is None else CLASS_SCORES.get(v.producer().op_type)
                                      for v in values]


@dataclass
class Reference:
    """The fp32 model's float outputs on the subset, and per layer the multiply-accumulates of one
    sample; ``normalized`` per output: True for probabilities, False for logits, None if not class
    scores."""

    names: list[str]
    normalized: list[bool | None]
    outputs: list[np.ndarray]
    feeds: list[dict[str, np.ndarray]]
    macs: dict[str, int]


def reference(model: ir.Model, plan: QuantPlan, data: CalibrationSet, threads: int = 0) -> Reference:
    """Run the fused fp32 ``model`` on ``data`` (one batch where the batch axis is free)."""
    names, normalized = float_outputs(model)
    nodes = {n.name: n for n in model.graph}
    layer_outputs = [nodes[name].outputs[0].name for name in plan.layers]
    session = runtime.session(with_outputs(model, layer_outputs), threads=threads, level="basic")
    feeds = list(data.batches(max(len(data), 1)))
    one = next(data.batches(1))
    first = dict(zip(layer_outputs, session.run(layer_outputs, one)))
    macs = {name: int(layer.weight.size * (first[out].size // layer.channels))
            for (name, layer), out in zip(plan.layers.items(), layer_outputs)}
    outputs = run_batches(session, names, feeds)
    return Reference(names, normalized, outputs, feeds, macs)


def build_probe(model: ir.Model, plan: QuantPlan, layers: list[str], ref: Reference, threads: int = 0,
                observe: Sequence[str] = ()) -> Probe:
    """The probe over the fused fp32 ``model`` (left unchanged) in which the named ``layers`` (or
    lookup tables) of ``plan`` are variable and the outputs of the ``observe`` layers can be read."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    graph = copy.graph
    nodes = {n.name: n for n in graph}
    weights, biases, inputs, base = {}, {}, {}, {}

    def variable(node: ir.Node, index: int, value: np.ndarray, role: str) -> str:
        """Make ``node``'s input ``index`` a graph input, fed ``value`` unless changed; its name."""
        v = ir.Value(name=f"{node.name}.probe.{role}", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape(value.shape))
        graph.inputs.append(v)
        node.replace_input_with(index, v)
        base[v.name] = value
        return v.name

    for name in layers:
        node = nodes[name]
        if name in plan.tables:  # a table is the Gather's data (input 0)
            weights[name] = variable(node, 0, plan.tables[name].table, "weight")
            continue
        weights[name] = variable(node, 1, plan.layers[name].weight, "weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            biases[name] = variable(node, 2, node.inputs[2].const_value.numpy(), "bias")
        if node.inputs[0].name in plan.activations:
            grid = InputGrid.of(plan.root(node.inputs[0].name))
            inputs[name] = _fake_quantized_input(graph, node)
            base |= {f"{inputs[name]}.mask": np.array(0.0, np.float32), **grid.feeds(inputs[name])}
    observed = {name: nodes[name].outputs[0].name for name in observe}
    graph.outputs.extend(nodes[name].outputs[0] for name in observe)
    common.RemoveUnusedNodesPass()(copy)  # the replaced weight initializers
    session = runtime.session(ir.serde.serialize_model(copy), threads=threads, level="all")
    return Probe(session, ref.feeds, base, weights, biases, inputs, ref, observed)


def layer_change(layer: LayerPlan | TablePlan) -> Change:
    """What the probe changes for ``layer`` as planned: its ŵ (a table's T̂), whether its input is
    quantized (a table has none) and its bias."""
    if isinstance(layer, TablePlan):
        return Change(layer.dequantized(), False)
    return Change(layer.dequantized(), layer.activation_input, layer.bias)
