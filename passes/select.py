"""Selection: decide which nodes run quantized and which tensors get a Q/DQ pair.

Rules, for onnxruntime's CPU QDQ fusions (uint8 activations, int8 weights):

* Layers with a constant weight — Conv, Gemm (transA=0, α=β=1), MatMul with a constant 2-D B — are
  planned with a symmetric per-output-channel weight grid; their float input and their output are
  quantized. A layer output that only feeds a Relu/Clip is quantized *after* the activation instead,
  with the grid clipped to the activation's bound, so onnxruntime removes the activation and fuses
  the pair into the layer (QLinearConv computes the clip for free).
* A Gemm or weight MatMul whose output is a graph output or feeds only float ops keeps a float output
  (QGemm / MatMulIntegerToFloat dequantize inside the kernel), saving one rounding.
* Add, Mul, GlobalAveragePool, AveragePool, Concat and activation×activation MatMul are quantized on
  all float inputs and their output (QLinearAdd, …). Constant inputs become stored uint8 codes.
* Data-movement ops (MaxPool, Reshape, Transpose, …) fed by a quantized tensor get an output grid
  *tied* to their input's, so onnxruntime drops their Q/DQ and moves the codes directly.
* Normalization statistics stay float: a tensor computed only from reductions (ReduceMean/Sum/Max…)
  through elementwise or shape ops — a mean, a variance E[x²]−E[x]², 1/√(σ²+ε) — has a range that
  varies from row to row, and one per-tensor grid for it costs more than the whole rest of the model
  (magika's LayerNorm spelled out in basic ops: quantizing its variance alone drops fp32 top-1
  agreement to 0.37). Add/Mul/Concat/MatMul reading such a tensor run in float.
* Add/Mul with an input computed only from integer graph inputs stay float: such a tensor is a mask
  or a bias of extreme magnitude (BERT's (1 − mask)·−10000), and one grid for both operands would
  spend all 256 codes on it (MiniLM: quantizing one attention-score Add drops the embedding cosine
  to 0.75). A weighted layer reading one (a one-hot input, as in magika) is still quantized.
* ``--exclude REGEX`` keeps matching nodes (by name or op type) in float. The outputs of float
  compute layers stay float too (see ``pinned`` below), so ops reading them run in float.

Below 8 bits the target's goal (``onnxptq/target.py``) picks the weight encoding: for ``speed`` every
layer keeps int8 storage with codes in [−7, 7], [−3, 3] or [−1, 1] on the same integer kernels as
8-bit weights; for ``size`` they are stored as int4 — MatMul/Gemm blocked along the reduction axis for
MatMulNBits (which takes a float activation input), Conv per channel — and 2- or 3-bit codes of any
layer per channel as int2 or int3 (a quarter or three eighths of a byte per weight, on the int8
kernels); ``generic`` stores int4 per
channel everywhere. The weighted layers' inputs take ``--a-bits`` (4: a 16-code grid); every other
quantized tensor keeps 8 bits (``_narrow_layer_inputs_only``). With ``first_last_8bit`` (the papers'
convention, on by default) the first and last weighted layers — those with no weighted layer before,
or after, them in the graph — keep 8-bit weights, and their input activations (and the last layers'
outputs) keep 8 bits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

import numpy as np
import onnx_ir as ir

from onnxptq.errors import InputError
from onnxptq.graph import attr, const, consumers, weight_channel_axis
from onnxptq.kernels.quant import symmetric_qmax
from onnxptq.plan import ActivationPlan, LayerPlan, QuantPlan, WeightGrid
from onnxptq.state import CompileState
from onnxptq.target import resolve_target

ELEMENTWISE = {"Add", "Mul"}
POOLS = {"GlobalAveragePool", "AveragePool"}
PASSTHROUGH = {"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice"}
BOUNDED = {"Relu", "Clip"}
COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceProd"}
POINTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Max", "Min", "Neg", "Abs", "Exp", "Log",
             "Clip", "Cast", "Identity", "Reshape", "Expand", "Unsqueeze", "Squeeze"}


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _weight_axis(node: ir.Node) -> int | None:
    """Output-channel axis of a quantizable layer's constant weight, or None if not quantizable."""
    w = const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype != np.float32 or not _is_float(node.inputs[0]):
        return None
    if node.op_type == "Conv" and w.ndim >= 3:
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return 0 if bias is None or const(bias) is not None else None
    if node.op_type == "Gemm" and w.ndim == 2:
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0:
            return None
        n = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            cv = const(c)
            if cv is None or cv.shape != (n,) or attr(node, "beta", 1.0) != 1.0:
                return None
        return weight_channel_axis(node)
    if node.op_type == "MatMul" and w.ndim == 2:
        return weight_channel_axis(node)
    return None


def statistics(graph: ir.Graph) -> set[str]:
    """Names of the tensors that only serve to compute reductions' statistics.

    Forward: a reduction's output, and the output of a pointwise or shape op whose computed
    (non-constant) inputs are all statistics (mean, variance, 1/√(σ²+ε)). Backward: the output of a
    pointwise op read only by reductions or statistics (the x² of E[x²]).
    """
    stats: set[str] = set()
    for node in graph:  # topological order: a node's inputs are classified before it
        computed = [v for v in node.inputs if v is not None and const(v) is None]
        if node.op_type in REDUCTIONS or (node.op_type in POINTWISE and computed
                                          and all(v.name in stats for v in computed)):
            stats.update(v.name for v in node.outputs)
    for node in reversed(list(graph)):  # reverse order: a node's consumers are classified before it
        users = [u for v in node.outputs for u in consumers(v)]
        if node.op_type in POINTWISE and users and not any(v.is_graph_output() for v in node.outputs) \
                and all(u.op_type in REDUCTIONS or all(v.name in stats for v in u.outputs) for u in users):
            stats.update(v.name for v in node.outputs)
    return stats


def from_integers(graph: ir.Graph) -> set[str]:
    """Names of the tensors computed from non-float graph inputs and constants by pointwise and shape
    ops alone (a lookup such as Gather into a constant table yields features, not a mask)."""
    derived = {v.name for v in graph.inputs if not _is_float(v)}
    for node in graph:
        computed = [v for v in node.inputs if v is not None and const(v) is None]
        if node.op_type in POINTWISE and computed and all(v.name in derived for v in computed):
            derived.update(v.name for v in node.outputs)
    return derived


def excluded(pattern: str | None) -> Callable[[ir.Node], bool]:
    """The ``--exclude`` test: whether a node's name or op type matches ``pattern``."""
    try:
        exclude = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise InputError(f"--exclude {pattern!r} is not a valid regular expression: {exc}") from exc
    return lambda node: bool(exclude and (exclude.search(node.name or "") or exclude.search(node.op_type)))


class SelectPass:
    """``bits``: per-layer weight bits by node name (None keeps the layer float), overriding ``--w-bits``
    for the named layers (mixed precision re-plans with it)."""

    name = "select"

    def __init__(self, bits: dict[str, int | None] | None = None):
        self.bits = bits or {}

    def run(self, state: CompileState) -> None:
        opts = state.options
        if opts.a_bits not in (8, 4):
            raise InputError(f"--a-bits {opts.a_bits} is not supported; use 8 or 4")
        if opts.w_bits not in (8, 4, 3, 2):
            raise InputError(f"--w-bits {opts.w_bits} is not supported; use 8, 4, 3 or 2")
        excluded_node = excluded(opts.exclude)
        target = resolve_target(opts.target)
        plan = state.plan
        plan.goal = target.goal
        graph = state.model.graph

        def want(value: ir.Value, bound: tuple[float, float] | None = None, tied_to: str | None = None) -> None:
            if value.name not in plan.activations:
                plan.activations[value.name] = ActivationPlan(
                    value.name, bits=opts.a_bits, bound=bound, tied_to=tied_to, constant=value.is_initializer())

        def want_output(node: ir.Node, float_ok: bool) -> None:
            out = node.outputs[0]
            users = consumers(out)
            if len(users) == 1 and not out.is_graph_output() and users[0].op_type in BOUNDED \
                    and not skipped(users[0]) and users[0].outputs[0].name in plan.bounds:
                act = users[0].outputs[0]
                want(act, bound=plan.bounds[act.name])
                return
            if float_ok and (out.is_graph_output() or not any(u.name in quantized for u in users)):
                return
            want(out)

        weighted = {n.name for n in graph
                    if n.op_type in COMPUTE and _weight_axis(n) is not None and not excluded_node(n)}
        first, last = edge_layers(graph, weighted)
        edges = first | last if opts.first_last_8bit and min(opts.w_bits, opts.a_bits) < 8 else set()

        def w_bits(node: ir.Node) -> int | None:
            """The layer's weight bits: mixed precision's choice (None: float), else 8 at the edges."""
            if node.name in self.bits:
                return self.bits[node.name]
            return 8 if node.name in edges else opts.w_bits

        def skipped(node: ir.Node) -> bool:
            return excluded_node(node) or (node.name in weighted and w_bits(node) is None)

        # Which nodes run quantized is decided first, so a layer knows whether its consumers do.
        # Outputs of float compute layers are pinned to float: a Q right after such a layer (or after
        # its Relu/Clip) would let onnxruntime quantize the layer's float weight and fuse it anyway.
        # Normalization statistics are pinned from the start.
        quantized: dict[str, str] = {}
        pinned: set[str] = statistics(graph)
        masks = from_integers(graph)
        float_in: set[str] = set()  # int4 layers: quantized, but they read a float input
        for node in graph:
            blocked = not skipped(node) and node.name in weighted and _blocked(node.op_type, w_bits(node), target.goal)
            if (blocked or self._runs_quantized(node, pinned, masks)) and not skipped(node):
                quantized[node.name] = node.op_type
                if blocked:  # MatMulNBits: float in, float out; a Q/DQ on either side blocks the fusion
                    pinned.update(v.name for v in node.outputs)
                    float_in.add(node.name)
            elif node.op_type in COMPUTE or (node.op_type in BOUNDED and node.inputs[0] is not None
                                            and node.inputs[0].name in pinned):
                pinned.update(v.name for v in node.outputs)
        # An elementwise op, pool or Concat pays only when an integer kernel reads its result;
        # otherwise the result is dequantized at once and the extra rounding buys no speed (in MiniLM,
        # the bias and residual Adds before each float LayerNorm cost 0.18 of embedding cosine).
        for node in reversed(list(graph)):
            if node.name in quantized and node.op_type not in COMPUTE \
                    and not self._feeds_integer(node.outputs[0], quantized.keys() - float_in):
                del quantized[node.name]

        for node in graph:
            if node.name in quantized:
                axis = _weight_axis(node)
                if axis is not None:
                    self._plan_layer(state, node, axis, weight_grid(node, axis, w_bits(node), target.goal,
                                                                    target.weight_qmax8, opts.block_size))
                    layer = plan.layers[node.name]
                    if layer.activation_input:
                        want(node.inputs[0])
                        want_output(node, float_ok=node.op_type in ("Gemm", "MatMul"))
                else:
                    for v in node.inputs:
                        want(v)
                    want_output(node, float_ok=node.op_type == "MatMul")
            elif node.op_type in PASSTHROUGH and not skipped(node) and node.inputs[0] is not None \
                    and node.inputs[0].name in plan.activations and _is_float(node.outputs[0]):
                want(node.outputs[0], tied_to=node.inputs[0].name)
        plan.ops = quantized
        if not plan.layers:
            raise InputError("the model has no quantizable layers (Conv, Gemm or MatMul with a constant "
                             "float weight); nothing to compile")
        if opts.a_bits < 8:
            self._narrow_layer_inputs_only(plan)
        kept = self._keep_edges_8bit(state, first & edges, last & edges)
        state.report.note(self.name, f"{len(plan.layers)} weighted layers, {len(quantized)} quantized ops, "
                                     f"{len(plan.activations)} quantized tensors; target {target.name}" + kept)
        state.report.model["target"] = target.name

    @staticmethod
    def _feeds_integer(value: ir.Value, quantized: Collection[str]) -> bool:
        """Whether a node planned to run quantized reads ``value``, directly or through data-movement
        ops and Relu/Clip (which onnxruntime runs on the codes or folds away)."""
        return any(u.name in quantized or (u.op_type in PASSTHROUGH | BOUNDED
                                           and SelectPass._feeds_integer(u.outputs[0], quantized))
                   for u in consumers(value))

    @staticmethod
    def _runs_quantized(node: ir.Node, pinned: set[str], masks: set[str]) -> bool:
        """Whether onnxruntime has an integer kernel for ``node`` as the rules above plan it."""
        if node.domain not in ("", "ai.onnx") or any(v is not None and v.name in pinned
                                                     for v in (*node.inputs, *node.outputs)):
            return False
        if node.op_type in ("Conv", "Gemm", "MatMul") and _weight_axis(node) is not None:
            return True
        if node.op_type == "MatMul":
            return all(_is_float(v) and const(v) is None for v in node.inputs)
        if node.op_type in ELEMENTWISE:
            return all(_is_float(v) and v.name not in masks for v in node.inputs) \
                and any(const(v) is None for v in node.inputs)
        if node.op_type in POOLS:
            return _is_float(node.inputs[0])
        if node.op_type == "Concat":
            return all(_is_float(v) for v in node.inputs)
        return False

    @staticmethod
    def _narrow_layer_inputs_only(plan: QuantPlan) -> None:
        """Keep ``--a-bits`` below 8 on the inputs of weighted layers only — the operands their
        multiply-accumulates read, which BOPs count and the papers quantize — and give every other
        quantized tensor 8 bits: layer outputs on their way to an Add, residual streams, the inputs of
        float LayerNorms and of activation×activation MatMuls. The integer kernels requantize their
        results to 8-bit codes at no extra cost, so a 16-code grid there only adds rounding."""
        narrow = {plan.root(layer.input_name).name for layer in plan.layers.values()
                  if layer.activation_input and layer.input_name in plan.activations}
        for act in plan.activations.values():
            if act.tied_to is None and act.name not in narrow:
                act.bits = 8

    @staticmethod
    def _keep_edges_8bit(state: CompileState, first: set[str], last: set[str]) -> str:
        """Give the first and last layers' input grids (and the last layers' output grids) 8 bits;
        returns the report's note."""
        plan = state.plan
        nodes = {n.name: n for n in state.model.graph}
        tensors = [plan.layers[n].input_name for n in first | last if n in plan.layers]
        tensors += [nodes[n].outputs[0].name for n in last if n in plan.layers]
        for name in tensors:
            if name in plan.activations:
                plan.root(name).bits = 8
        kept = sorted(n for n in first | last if n in plan.layers)
        state.report.model["first_last_8bit"] = kept
        return f"; first/last layers kept at 8 bits: {', '.join(kept)}" if kept else ""

    @staticmethod
    def _plan_layer(state: CompileState, node: ir.Node, axis: int, grid: WeightGrid) -> None:
        w = const(node.inputs[1])
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        state.plan.layers[node.name] = LayerPlan(
            node=node.name, op_type=node.op_type, weight_name=node.inputs[1].name,
            weight=w.copy(), grid=grid, input_name=node.inputs[0].name,
            bias_name=None if bias_v is None else bias_v.name,
            bias=None if bias_v is None else const(bias_v).copy(),
            bn=state.plan.folded_bn.get(node.name),
            activation_input=grid.block_size is None)


def _blocked(op_type: str, bits: int, goal: str) -> bool:
    """Whether a layer is stored as int4 blocks along K for MatMulNBits (float activation input); 2- and
    3-bit codes are not: int2 / int3 per channel take under ½ / ⅔ of the bytes (``weight_storage``)."""
    return goal == "size" and bits == 4 and op_type in ("MatMul", "Gemm")


def weight_storage(bits: int, goal: str) -> str:
    """The initializer type of a per-channel weight grid of ``bits`` < 8 under the target's ``goal``:
    int8 codes (``speed``); under ``size`` int2 for 2-bit codes and int3 for 3-bit ones (eight per three
    bytes, ``onnxptq/int3.py``), which onnxruntime unpacks to int8 at load as it does int4; else int4."""
    if goal == "speed":
        return "int8"
    if goal == "size" and bits in (2, 3):
        return f"int{bits}"
    return "int4"


def weight_grid(node: ir.Node, axis: int, bits: int, goal: str, qmax8: int, block_size: int) -> WeightGrid:
    """The weight grid of a layer at ``bits`` for the target's ``goal`` (see the module docstring)."""
    if bits == 8:
        return WeightGrid(bits=8, qmax=qmax8, axis=axis)
    qmax = symmetric_qmax(bits)
    if _blocked(node.op_type, bits, goal):
        # Blocked along the reduction axis K: axis 0 of a [K, N] weight, axis 1 of a transB Gemm's
        # [N, K] (emission transposes it, as MatMulNBits wants B as [K, N]).
        k_axis = 1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0
        return WeightGrid(bits=bits, qmax=qmax, qmin=-qmax - 1, axis=k_axis, block_size=block_size, storage="int4")
    return WeightGrid(bits=bits, qmax=qmax, axis=axis, storage=weight_storage(bits, goal))


def edge_layers(graph: ir.Graph, weighted: set[str]) -> tuple[set[str], set[str]]:
    """(first, last): the nodes of ``weighted`` with no other weighted node before them (on any path
    from a graph input) and those with none after them (on any path to a graph output)."""
    def sweep(nodes: list[ir.Node], ins, outs) -> set[str]:
        reached: set[str] = set()  # values with a weighted node upstream (in sweep order)
        edge = set()
        for node in nodes:
            seen = any(v is not None and v.name in reached for v in ins(node))
            if node.name in weighted and not seen:
                edge.add(node.name)
            if seen or node.name in weighted:
                reached.update(v.name for v in outs(node) if v is not None)
        return edge

    nodes = list(graph)
    first = sweep(nodes, lambda n: n.inputs, lambda n: n.outputs)
    last = sweep(nodes[::-1], lambda n: n.outputs, lambda n: n.inputs)
    return first, last
