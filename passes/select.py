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

With 4-bit weights, Conv keeps int8 storage with codes in [−7, 7] (4-bit values on QLinearConv, the
fast path), while MatMul/Gemm store int4 blocked along the reduction axis for MatMulNBits, which
takes a float activation input. With 3 or 2 bits every layer keeps int8 storage, codes in [−3, 3] or
[−1, 1], on the same integer kernels as 8-bit weights.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from onnxptq.errors import InputError
from onnxptq.graph import attr, const, consumers
from onnxptq.plan import ActivationPlan, LayerPlan, WeightGrid
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
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and w.ndim == 2:
        return 1
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


class SelectPass:
    """``bits``: per-layer weight bits by node name (None keeps the layer float), overriding ``--w-bits``
    for the named layers (mixed precision re-plans with it)."""

    name = "select"

    def __init__(self, bits: dict[str, int | None] | None = None):
        self.bits = bits or {}

    def _bits(self, state: CompileState, node: ir.Node) -> int | None:
        return self.bits.get(node.name, state.options.w_bits)

    def run(self, state: CompileState) -> None:
        opts = state.options
        if opts.a_bits != 8:
            raise InputError("--a-bits supports 8 only for now (4-bit activations arrive with the "
                             "4-bit encodings); use --a-bits 8")
        try:
            exclude = re.compile(opts.exclude) if opts.exclude else None
        except re.error as exc:
            raise InputError(f"--exclude {opts.exclude!r} is not a valid regular expression: {exc}") from exc
        target = resolve_target(opts.target)
        plan = state.plan
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

        def skipped(node: ir.Node) -> bool:
            if node.op_type in COMPUTE and self._bits(state, node) is None:
                return True
            return bool(exclude and (exclude.search(node.name or "") or exclude.search(node.op_type)))

        # Which nodes run quantized is decided first, so a layer knows whether its consumers do.
        # Outputs of float compute layers are pinned to float: a Q right after such a layer (or after
        # its Relu/Clip) would let onnxruntime quantize the layer's float weight and fuse it anyway.
        # Normalization statistics are pinned from the start.
        quantized: dict[str, str] = {}
        pinned: set[str] = statistics(graph)
        masks = from_integers(graph)
        float_in: set[str] = set()  # int4 layers: quantized, but they read a float input
        for node in graph:
            int4 = self._bits(state, node) == 4 and node.op_type in ("MatMul", "Gemm") \
                and _weight_axis(node) is not None
            if (int4 or self._runs_quantized(node, pinned, masks)) and not skipped(node):
                quantized[node.name] = node.op_type
                if int4:  # MatMulNBits: float in, float out; a Q/DQ on either side blocks the fusion
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
                    self._plan_layer(state, node, axis, target.weight_qmax8)
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
        state.report.note(self.name, f"{len(plan.layers)} weighted layers, {len(quantized)} quantized ops, "
                                     f"{len(plan.activations)} quantized tensors; target {target.name}")
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

    def _plan_layer(self, state: CompileState, node: ir.Node, axis: int, qmax8: int) -> None:
        w = const(node.inputs[1])
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        transposed = node.op_type == "Gemm" and bool(attr(node, "transB", 0))
        grid = weight_grid(node.op_type, self._bits(state, node), axis, transposed, qmax8, state.options.block_size)
        state.plan.layers[node.name] = LayerPlan(
            node=node.name, op_type=node.op_type, weight_name=node.inputs[1].name,
            weight=w.copy(), grid=grid, input_name=node.inputs[0].name,
            bias_name=None if bias_v is None else bias_v.name,
            bias=None if bias_v is None else const(bias_v).copy(),
            bn=state.plan.folded_bn.get(node.name),
            activation_input=grid.storage != "int4")


def weight_grid(op_type: str, bits: int, axis: int, transposed: bool, qmax8: int, block_size: int) -> WeightGrid:
    """The (unscaled) weight grid of a layer at ``bits``: see the module doc for which storage each
    op gets. ``axis`` is the output-channel axis; ``transposed`` marks a transB Gemm."""
    if bits == 8:
        return WeightGrid(bits=8, qmax=qmax8, axis=axis)
    if bits in (2, 3) or (bits == 4 and op_type == "Conv"):
        return WeightGrid(bits=bits, qmax=2 ** (bits - 1) - 1, axis=axis)
    if bits == 4:
        # Blocked along the reduction axis K: axis 0 of a [K, N] weight, axis 1 of a transB Gemm's
        # [N, K] (emission transposes it, as MatMulNBits wants B as [K, N]).
        return WeightGrid(bits=4, qmax=7, qmin=-8, axis=1 if transposed else 0, block_size=block_size,
                          storage="int4")
    raise InputError(f"--w-bits {bits} is not supported; use 8, 4, 3 or 2")
