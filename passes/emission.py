"""Emission: write the plan as a QDQ ONNX model for onnxruntime's CPU integer kernels.

The only pass that writes Q/DQ nodes. It works on a copy of the fused graph:

* weights become integer initializers behind a DequantizeLinear: int8 per output channel
  (``axis`` = the channel axis, zero point 0), or int4 blocked along K for MatMul/Gemm (opset 21
  ``block_size``), which onnxruntime turns into MatMulNBits, their scales stored as float16 behind a
  Cast to float (folded at load like the Cast of packed codes; ``half_scales``); per-channel int4
  storage (goal ``size``) is int4 → Cast(int8) → DequantizeLinear: onnxruntime folds the Cast of a
  constant at load, so the file holds packed int4 and the layer still fuses into QLinearConv/QGemm
  (goal ``generic`` writes the plain DequantizeLinear of int4); 2-bit codes under goal ``size`` are
  int2 → Cast(int8) the same way, four per byte (opset 25: onnxruntime 1.32 loads and folds it, the
  layer fuses as at int4);
* biases become int32 at scale s_x·s_w[c] (what QLinearConv/QGemm accumulate in), written without a zero
  point (0 by the standard; a per-channel int32 zero point costs 4 bytes a channel for nothing);
  layers with a float input (int4 MatMulNBits) keep the plan's bias in float;
* goal ``size`` writes per-channel weights compactly, on the same codes: no zero point (0 by the
  standard; a Gemm keeps it, ``weight_zero_point``), the scales as float16 behind a Cast
  (``half_scales``: the stored s_w moves by at most 2⁻¹¹·s_w and no code moves, so pair-safe codes stay
  pair-safe), and the bias step as Mul(s_x, s_w) of the stored scales (``product_scale``) instead of a
  float32 per channel. onnxruntime folds the Cast and the Mul at load and fuses the layer as before
  (``tests/test_compact.py``). EfficientNet-Lite0's uniform packed 4-bit file: 2,688,172 → 2,574,624
  bytes (it held 21 kB of zero points, 84 kB of weight scales and 84 kB of bias steps);
* every planned activation t gets t → QuantizeLinear(s, z) → DequantizeLinear → consumers, uint8;
  tied tensors repeat their root's (s, z) so onnxruntime can drop the pair; constant inputs are
  stored as uint8 codes behind a DequantizeLinear;
* lookup tables (``plan.tables``) become int8 codes that the Gather reads, dequantized after it
  (4-bit tables: int4 → Cast(int8) → Gather, the Cast folded at load; 2-bit tables the same from int2).

**Activations below 8 bits on int8 kernels** (goals ``speed`` and ``size``). A b-bit grid (s, z) has
codes [0, Q], Q = 2ᵇ − 1. It is written as one uint8 pair with the codes clipped in between:

    t → Q(s, z) → Clip(0, Q) → DQ(s, z) → consumers

The Q fuses into the producing kernel's output as usual (QLinearConv, QGemm, QLinearAdd, …; an
absorbed Relu/Clip is bypassed, the Q reading its input: the clipped codes stay in its bound), the Clip
runs on the uint8 codes and the DQ fuses into the consumers' inputs, so the codes the next kernel reads are clip(rint(t/s) + z, 0, Q),
exactly the b-bit grid. ``python -m benchmarks.probe_caps --runs 100`` compares the alternatives,
latency vs the same model at W8A8 on this AVX2 host: Clip on the codes 1.027× (EfficientNet-Lite0) /
1.018× (magika); two pairs Q(s, z+255−Q)→DQ→op→Q(s, z)→DQ with the op a QLinearAdd of 0 1.138× /
1.024×, or a QLinearLeakyRelu table 1.365× / 1.040×; two pairs back to back leave EfficientNet's
layers in float (4.2×). A uint4 Q/DQ makes onnxruntime's optimizer emit invalid graphs.
``tests/test_fourbit.py`` checks the fused graph and the codes.
Goal ``generic`` writes the plain uint4 pair instead.

The emitted model computes, in float, exactly what the integer kernels compute in integers.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx import version_converter

from onnxptq import int3
from onnxptq.errors import InputError
from onnxptq.graph import add_initializer, set_const
from onnxptq.half_floats import half_floats
from onnxptq.kernels.quant import block_scales, broadcast_channel, quantize
from onnxptq.plan import ActivationPlan, LayerPlan, QuantPlan, TablePlan
from onnxptq.short_names import shorten_names
from onnxptq.state import CompileState

INT32 = np.iinfo(np.int32)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _with_opset(proto: onnx.ModelProto, needed: int) -> onnx.ModelProto:
    """``proto`` converted to at least opset ``needed`` (per-channel DQ needs 13, int4 21, int2 25)."""
    if _opset(proto) >= needed:
        return proto
    try:
        converted = version_converter.convert_version(proto, needed)
        # int4 tensors exist from IR version 10 on (paired with opset 21), int2 from 11; the converter
        # leaves the IR version as it was, and onnxruntime then skips its int4 fusions.
        converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", needed)]))
        return converted
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors per op
        raise InputError(f"cannot upgrade the model from opset {_opset(proto)} to {needed}, which the "
                         f"quantized encoding needs ({str(exc).splitlines()[0]}); re-export it at opset "
                         f"{needed} or use --w-bits 8") from exc


class _Writer:
    """Inserts DequantizeLinear / QuantizeLinear nodes into one graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.bounds: dict[int, tuple[ir.Value, ir.Value]] = {}

    def dq(self, name: str, codes: np.ndarray, scale: np.ndarray | ir.Value, zero_point: np.ndarray | None,
           axis: int | None = None, block_size: int | None = None, packed: str | None = None) -> ir.Value:
        """Initializer ``codes`` behind a DequantizeLinear; returns the float output value. With ``packed``
        (int4, int3, int2) the codes are stored so and unpacked to int8 (``_packed``), and a float16
        ``scale`` passes through a Cast to float (all folded at load); a ``scale`` given as a value
        (``product_scale``) is used as it is."""
        casts = []
        if packed:
            casts.append(self._packed(codes, packed, ir.DataType.INT8, name, self._first()))
            stored = casts[-1].outputs[0]
        else:
            stored = add_initializer(self.graph, f"{name}_quantized", codes)
        scale_value = scale if isinstance(scale, ir.Value) else add_initializer(self.graph, f"{name}_scale", scale)
        if not isinstance(scale, ir.Value) and scale.dtype == np.float16:
            casts.append(self._unpacked(scale_value, ir.DataType.FLOAT, f"{name}_scale", self._first()))
            scale_value = casts[-1].outputs[0]
        inputs = [stored, scale_value]
        if zero_point is not None:
            inputs.append(add_initializer(self.graph, f"{name}_zero_point", zero_point))
        attrs = {}
        if axis is not None:
            attrs["axis"] = axis
        if block_size is not None:
            attrs["block_size"] = block_size
        node = ir.node("DequantizeLinear", inputs, attrs, name=f"{name}_DequantizeLinear")
        node.outputs[0].name = f"{name}_dequantized"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = ir.Shape(codes.shape)
        if casts:  # each Cast went in first, so the first made is the last in the graph
            self.graph.insert_after(casts[0], node)
        else:
            self.graph.insert_before(self._first(), node)
        return node.outputs[0]

    def product_scale(self, name: str, s_x: np.float32, s_w: ir.Value) -> ir.Value:
        """The value s_x·s_w computed in the graph from a scalar initializer s_x and the weight's stored
        scale ``s_w`` (after its Cast): onnxruntime folds it at load into the same float32 products
        ``int32_bias`` rounds with, so the bias steps cost 4 bytes a layer instead of 4 a channel."""
        mul = ir.node("Mul", [add_initializer(self.graph, f"{name}_input_scale", np.array(s_x, np.float32)), s_w],
                      name=f"{name}_scale_Mul")
        out = mul.outputs[0]
        out.name, out.type, out.shape = f"{name}_scale", ir.TensorType(ir.DataType.FLOAT), s_w.shape
        self.graph.insert_before(self._first(), mul)
        return out

    def _unpacked(self, stored: ir.Value, dtype: ir.DataType, name: str, before: ir.Node) -> ir.Node:
        """A Cast of the initializer ``stored`` (packed codes, float16 scales) to ``dtype``, inserted
        before ``before``."""
        cast = ir.node("Cast", [stored], {"to": dtype}, name=f"{name}_Cast")
        out = cast.outputs[0]
        out.name, out.type, out.shape = f"{name}_unpacked", ir.TensorType(dtype), stored.shape
        self.graph.insert_before(before, cast)
        return cast

    def _packed(self, codes: np.ndarray, storage: str, dtype: ir.DataType, name: str, before: ir.Node) -> ir.Node:
        """Integer ``codes`` stored as ``storage`` and the node, inserted before ``before``, that gives
        them back as ``dtype``: int4 / int2 initializers behind a Cast; int3 (int8 only) packed eight per
        three bytes behind ``Int3ToInt8`` (``onnxptq/int3.py``; ``emit_model`` adds the function)."""
        if storage != "int3":
            return self._unpacked(add_initializer(self.graph, f"{name}_quantized", codes.astype(PACKED[storage])),
                                  dtype, name, before)
        stored = add_initializer(self.graph, f"{name}_quantized", int3.pack(codes))
        shape = add_initializer(self.graph, f"{name}_shape", np.array(codes.shape, np.int64))
        unpack = ir.node(int3.FUNCTION, [stored, shape], domain=int3.DOMAIN, name=f"{name}_{int3.FUNCTION}")
        out = unpack.outputs[0]
        out.name, out.type, out.shape = f"{name}_unpacked", ir.TensorType(ir.DataType.INT8), ir.Shape(codes.shape)
        self.graph.insert_before(before, unpack)
        return unpack

    def qdq(self, value: ir.Value, scale: np.float32, zero_point: int, skip: set[str],
            dtype: type = np.uint8) -> None:
        """Route ``value`` through Q→DQ for all its consumers but those named in ``skip``; codes of
        ``dtype`` (uint8, or ml_dtypes.uint4 for a plain 4-bit pair)."""
        q, dq = self._pair(value, scale, np.array(zero_point, dtype), value.name)
        self._reroute(value, dq.outputs[0], skip | {q.name})
        self._insert_after_producer(value, [q, dq])

    def capped_qdq(self, value: ir.Value, scale: np.float32, zero_point: int, qmax: int, skip: set[str],
                   source: ir.Value | None = None) -> None:
        """Route ``value`` through Q(s, z) → Clip(0, ``qmax``) → DQ(s, z): a grid of qmax + 1 < 256 codes
        on uint8 (module docstring). With ``source`` (the input of an absorbed Relu/Clip producing
        ``value``) the Q reads ``source`` and that op drops out."""
        src = source if source is not None else value
        q, dq = self._pair(src, scale, np.array(zero_point, np.uint8), value.name)
        if qmax not in self.bounds:
            self.bounds[qmax] = (add_initializer(self.graph, "cap_low", np.array(0, np.uint8)),
                                 add_initializer(self.graph, f"cap_high{qmax}", np.array(qmax, np.uint8)))
        clip = ir.node("Clip", [q.outputs[0], *self.bounds[qmax]], name=f"{value.name}_cap")
        capped = clip.outputs[0]
        capped.name, capped.type, capped.shape = f"{value.name}_capped", q.outputs[0].type, value.shape
        dq.replace_input_with(0, capped)
        named_output = value.is_graph_output()  # _reroute gives a graph output's name to the DQ itself
        self._reroute(value, dq.outputs[0], skip | {q.name} if source is None else set())
        if source is not None and not named_output:
            # The absorbed op's output leaves the graph; its consumers' input keeps the name, so a pass
            # that reads the tensor from the emitted model (sequential AdaQuant) still finds it.
            dq.outputs[0].name, value.name = value.name, f"{value.name}_absorbed"
        self._insert_after_producer(src, [q, clip, dq])

    def _pair(self, value: ir.Value, scale: np.float32, zero_point: np.ndarray, name: str) -> tuple[ir.Node, ir.Node]:
        s = add_initializer(self.graph, f"{name}_scale", np.array(scale, np.float32))
        z = add_initializer(self.graph, f"{name}_zero_point", zero_point)
        q = ir.node("QuantizeLinear", [value, s, z], name=f"{name}_QuantizeLinear")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{name}_DequantizeLinear")
        q.outputs[0].name = f"{name}_quantized"
        q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(zero_point.dtype))
        out = dq.outputs[0]
        out.name = f"{name}_dequantized"
        out.type, out.shape = value.type, value.shape
        return q, dq

    def _reroute(self, value: ir.Value, new: ir.Value, skip: set[str]) -> None:
        """Make ``new`` feed every consumer of ``value`` not named in ``skip``, and take its place (and
        name) among the graph outputs."""
        for use in list(value.uses()):
            if use.node.name not in skip:
                use.node.replace_input_with(use.idx, new)
        if value.is_graph_output():
            outputs = self.graph.outputs
            i = next(k for k, v in enumerate(outputs) if v is value)
            name = value.name
            value.name = f"{name}_float"
            outputs[i] = new
            new.name = name

    def _insert_after_producer(self, value: ir.Value, nodes: list[ir.Node]) -> None:
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(self._first(), nodes)
        else:
            self.graph.insert_after(producer, nodes)

    def gathered_codes(self, node: ir.Node, table: TablePlan) -> None:
        """Make Gather ``node`` look up ``table``'s int8 codes instead of its float values and
        dequantize what it gathers along the last axis with the per-column scale and zero point. 2- to
        4-bit codes are stored packed and unpacked to int8 before the lookup (``_packed``, folded at
        load). The dequantized value takes the Gather output's name, so activation plans keyed on it
        apply to it."""
        name, codes = table.name, table.codes()
        if table.bits == 8:
            stored = add_initializer(self.graph, f"{name}_quantized", codes)
        else:
            stored = self._packed(codes, f"int{table.bits}", ir.DataType.INT8, name, node).outputs[0]
        node.replace_input_with(0, stored)
        value = node.outputs[0]
        s = add_initializer(self.graph, f"{name}_scale", table.scale.astype(np.float32))
        z = add_initializer(self.graph, f"{name}_zero_point", table.zero_point.astype(np.int8))
        dq = ir.node("DequantizeLinear", [value, s, z], {"axis": -1}, name=f"{name}_DequantizeLinear")
        out = dq.outputs[0]
        out.type, out.shape = value.type, value.shape
        if not value.is_graph_output():  # (a graph output is renamed by _reroute)
            out.name, value.name = value.name, f"{value.name}_gathered"
        self._reroute(value, out, {dq.name})
        value.type = ir.TensorType(ir.DataType.INT8)
        self.graph.insert_after(node, dq)

    def _first(self) -> ir.Node:
        return next(iter(self.graph))


PACKED = {"int4": ml_dtypes.int4, "int2": ml_dtypes.int2}  # packed storage → the codes' numpy type (int3: ``_packed``)


def _emit_layer(w: _Writer, node: ir.Node, layer: LayerPlan, plan: QuantPlan) -> None:
    grid = layer.grid
    if grid.block_size:
        w_kn = layer.weight if grid.axis == 0 else layer.weight.T
        stored = half_scales(grid.scale)
        codes = quantize(w_kn, block_scales(stored.astype(np.float32), grid.block_size, w_kn.shape[0]), 0,
                         grid.low, grid.qmax).astype(ml_dtypes.int4)
        node.replace_input_with(1, w.dq(layer.weight_name, codes, stored, None, axis=0, block_size=grid.block_size))
        if grid.axis == 1:
            node.attributes["transB"] = ir.Attr("transB", ir.AttributeType.INT, 0)
        if layer.bias is not None:
            set_const(w.graph, node, 2, layer.bias.astype(np.float32), layer.bias_name)
        return
    s_w = grid.scale.astype(np.float32)
    codes = quantize(layer.weight, broadcast_channel(s_w, grid.axis, layer.weight.ndim), 0, grid.low, grid.qmax)
    # Packed codes are unpacked to int8 where onnxruntime folds the unpacking at load (the integer
    # kernels take int8 weights); the generic encoding dequantizes int4 directly.
    if plan.goal == "generic" and grid.storage == "int4":
        weight = w.dq(layer.weight_name, codes.astype(ml_dtypes.int4), s_w, np.zeros(len(s_w), ml_dtypes.int4),
                      axis=grid.axis)
    else:  # goal size stores the same codes compactly (module doc)
        weight = w.dq(layer.weight_name, codes.astype(np.int8), stored_scale(layer, plan.goal),
                      weight_zero_point(layer, plan.goal), axis=grid.axis,
                      packed=grid.storage if grid.storage != "int8" else None)
    node.replace_input_with(1, weight)
    if layer.bias is not None and layer.activation_input:
        b_q, s_b = int32_bias(layer, plan)
        if plan.goal == "size":
            s_b = w.product_scale(layer.bias_name, plan.act_params(layer.input_name)[0], weight.producer().inputs[1])
        node.replace_input_with(2, w.dq(layer.bias_name, b_q, s_b, None, axis=0))


def half_scales(scale: np.ndarray) -> np.ndarray:
    """A blocked grid's scales (and under goal ``size`` a per-channel grid's) as stored: float16 where
    every one is a normal float16, else float32.

    At int4 a block's 16 bytes of codes came with 4 bytes of float32 scale (5 bits a weight); float16
    makes it 4.5, 4% of PP-OCRv4's packed file (its 6625-class head alone has 26,500 scales). Rounding
    s to float16 moves it by at most 2⁻¹¹·s, and a code q = w/s ≤ 8 by at most 8·2⁻¹¹ < ½, so the codes
    of a solver's ŵ = q·s come back unchanged and ŵ moves by ≤ 0.05%. A scale below float16's normal
    range (2⁻¹⁴, a block of weights all below 4·10⁻⁴) would lose that precision: such a grid stays float32."""
    s = np.asarray(scale, np.float32)
    half = np.finfo(np.float16)
    return s.astype(np.float16) if np.all((s >= half.tiny) & (s <= half.max)) else s


def weight_zero_point(layer: LayerPlan, goal: str) -> np.ndarray | None:
    """The zero point (all 0) of a per-channel weight's DequantizeLinear: none under goal ``size`` (0 by
    the standard) except for a Gemm, which onnxruntime 1.32 fuses into QGemm only with one (a MatMul or
    Conv without one still becomes QLinearMatMul / QLinearConv)."""
    if goal == "size" and layer.op_type != "Gemm":
        return None
    return np.zeros(layer.channels, np.int8)


def stored_scale(layer: LayerPlan, goal: str) -> np.ndarray:
    """A per-channel grid's scales as the emitted file holds them: under goal ``size`` float16 where
    ``half_scales`` stores them so, else float32 (the codes are the plan's either way)."""
    s = layer.grid.scale.astype(np.float32)
    return half_scales(s) if goal == "size" else s


def int32_bias(layer: LayerPlan, plan: QuantPlan) -> tuple[np.ndarray, np.ndarray]:
    """(codes, step) of the int32 bias emission writes for ``layer`` (a per-channel grid, quantized
    input): step s_b = s_x·s_w,c, codes clip(rint(b/s_b)) to int32 — the bias the integer kernel adds."""
    s_b = (plan.act_params(layer.input_name)[0] * stored_scale(layer, plan.goal).astype(np.float32)).astype(np.float32)
    return np.clip(np.rint(layer.bias / s_b), INT32.min, INT32.max).astype(np.int32), s_b


def _absorbed(value: ir.Value, act: ActivationPlan) -> ir.Value | None:
    """The input of the Relu/Clip producing ``value`` when selection absorbed it into a bounded grid,
    else None. The clipped codes stay within the bound, so the op is redundant; onnxruntime itself
    drops a Relu/Clip before a Q only when the Q's whole uint8 range fits the bound, which a 16-code
    grid's range (255 steps) does not for a Clip."""
    producer = value.producer()
    if act.bound is None or producer is None or producer.op_type not in ("Relu", "Clip"):
        return None
    pre = producer.inputs[0]
    return pre if len(pre.uses()) == 1 and not pre.is_graph_output() else None


def _capped(plan: QuantPlan, act: ActivationPlan) -> bool:
    """Whether ``act`` is written as a capped uint8 pair (a grid of fewer than 256 codes, not tied to
    another grid, not a plain uint4 tensor)."""
    return plan.root(act.name).qmax < 255 and act.tied_to is None and not _narrow(plan, act)


def _capped_source(plan: QuantPlan, value: ir.Value) -> ir.Value | None:
    """The tensor the capped Q of ``value`` reads instead of ``value`` (an absorbed Relu/Clip's
    input), for an activation emitted as a capped pair; else None."""
    act = plan.activations[value.name]
    return _absorbed(value, act) if _capped(plan, act) else None


def quantized_from(fp32: ir.Model, plan: QuantPlan) -> dict[str, str]:
    """Activation name → the tensor of the emitted model that holds its value *before* quantization,
    where that is another tensor: an absorbed Relu/Clip drops out, so its input x is quantized
    directly (clip(round(x/s), 0, Q) = clip(round(relu(x)/s), 0, Q) for a zero point of 0 and a grid
    inside the bound) and the activation's own name is taken by the dequantized codes. A pass that
    re-fits the input grid must read x, not the codes of the grid it is changing."""
    values = {v.name: v for n in fp32.graph for v in n.outputs}
    found = {}
    for name in plan.activations:
        value = values.get(name)
        source = None if value is None or value.is_graph_output() else _capped_source(plan, value)
        if source is not None:
            found[name] = source.name
    return found


def _narrow(plan: QuantPlan, act: ActivationPlan) -> bool:
    """Whether ``act`` is written as a plain uint4 tensor (goal ``generic``, a grid of ≤ 4 bits)."""
    return plan.goal == "generic" and plan.root(act.name).bits <= 4


def emit_model(fp32: ir.Model, plan: QuantPlan) -> ir.Model:
    """The QDQ model of ``plan`` over a copy of the fused graph ``fp32`` (which is left unchanged).

    Node names are kept, so a planned layer is found in the result by its name.
    """
    # int4 tensors need opset 21 (int2 25, int3's function 18); the generic target promises opset-21 QDQ
    # at every bit width.
    storages = {l.grid.storage for l in plan.layers.values()} | {f"int{t.bits}" for t in plan.tables.values()}
    opset21 = plan.goal == "generic" or "int4" in storages or any(_narrow(plan, a) for a in plan.activations.values())
    opset = 25 if "int2" in storages else 21 if opset21 or "int3" in storages else 13
    model = ir.serde.deserialize_model(_with_opset(ir.serde.serialize_model(fp32), opset))
    graph = model.graph
    nodes = {n.name: n for n in graph}
    writer = _Writer(graph)
    for name, layer in plan.layers.items():
        _emit_layer(writer, nodes[name], layer, plan)
    for name, table in plan.tables.items():
        writer.gathered_codes(nodes[name], table)
    values = {v.name: v for n in graph for v in n.outputs} | {v.name: v for v in graph.inputs}
    float_input = {name for name, layer in plan.layers.items() if not layer.activation_input}
    for name, act in plan.activations.items():
        scale, zp = plan.act_params(name)
        root = plan.root(name)
        dtype = ml_dtypes.uint4 if _narrow(plan, act) else np.uint8
        if act.constant:
            init = graph.initializers[name]
            codes = quantize(init.const_value.numpy(), scale, zp, 0, root.qmax).astype(dtype)
            dq = writer.dq(name, codes, np.array(scale, np.float32), np.array(zp, dtype))
            for use in list(init.uses()):
                if use.node.name in plan.ops:
                    use.node.replace_input_with(use.idx, dq)
        elif _capped(plan, act):
            value = values[name]
            writer.capped_qdq(value, scale, zp, root.qmax, float_input, source=_capped_source(plan, value))
        else:
            writer.qdq(values[name], scale, zp, skip=float_input, dtype=dtype)
    if "int3" in storages:
        function = ir.serde.deserialize_function(int3.function(opset))
        model.functions[function.identifier()] = function
        model.opset_imports[int3.DOMAIN] = 1
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
    return model


def output_model(state: CompileState) -> onnx.ModelProto:
    """The QDQ model of the current plan as the compile writes it, stamped with the options.

    Of the intermediate values' shapes (``value_info``) only those the source model recorded are
    written: the rest were inferred during the compile, onnxruntime infers them again at load, and
    they were 4% of PP-OCRv4's packed 4-bit file (70 kB of 1.86 MB), bytes a size budget pays for.
    Under goal ``size`` the float constants of float ops are stored as float16 (``onnxptq/half_floats.py``)
    and the values get short names (``onnxptq/short_names.py``) unless the options keep them."""
    out = ir.serde.serialize_model(emit_model(state.model, state.plan))
    recorded = {v.name for v in state.source.graph.value_info}
    kept = [v for v in out.graph.value_info if v.name in recorded]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    if state.plan.goal == "size":
        half_floats(out)
        if state.options.short_names:
            shorten_names(out, set(state.plan.layers) | set(state.plan.ops))
    out.producer_name = "onnxptq"
    stamp = {"options": state.options.to_dict(), "target": state.report.model.get("target")}
    meta = {p.key: p.value for p in out.metadata_props}
    meta["onnxptq"] = json.dumps(stamp, sort_keys=True)
    del out.metadata_props[:]
    for key in sorted(meta):
        out.metadata_props.add(key=key, value=meta[key])
    return out


class EmissionPass:
    name = "emission"

    def run(self, state: CompileState) -> None:
        out = output_model(state)
        state.output = out
        state.report.note(self.name, f"opset {_opset(out)}, {len(out.graph.node)} nodes")
