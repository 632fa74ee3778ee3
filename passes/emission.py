"""Emission: write the plan as a QDQ ONNX model for onnxruntime's CPU integer kernels.

The only pass that writes Q/DQ nodes. It works on a copy of the fused graph:

* weights become integer initializers behind a DequantizeLinear: int8 per output channel
  (``axis`` = the channel axis, zero point 0), or int4 blocked along K for MatMul/Gemm (opset 21
  ``block_size``), which onnxruntime turns into MatMulNBits;
* biases become int32 at scale s_x·s_w[c] (what QLinearConv/QGemm accumulate in), zero point 0;
  layers with a float input (int4 MatMulNBits) keep the plan's bias in float;
* every planned activation t gets t → QuantizeLinear(s, z) → DequantizeLinear → consumers, uint8;
  tied tensors repeat their root's (s, z) so onnxruntime can drop the pair; constant inputs are
  stored as uint8 codes behind a DequantizeLinear.

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

from onnxptq.errors import InputError
from onnxptq.graph import add_initializer, set_const
from onnxptq.kernels.quant import block_scales, broadcast_channel, quantize
from onnxptq.plan import LayerPlan, QuantPlan
from onnxptq.state import CompileState

INT32 = np.iinfo(np.int32)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _with_opset(proto: onnx.ModelProto, needed: int) -> onnx.ModelProto:
    """``proto`` converted to at least opset ``needed`` (per-channel DQ needs 13, int4 blocks 21)."""
    if _opset(proto) >= needed:
        return proto
    try:
        converted = version_converter.convert_version(proto, needed)
        # int4 tensors exist from IR version 10 on (the one paired with opset 21); the converter
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

    def dq(self, name: str, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
           axis: int | None = None, block_size: int | None = None) -> ir.Value:
        """Initializer ``codes`` behind a DequantizeLinear; returns the float output value."""
        inputs = [add_initializer(self.graph, f"{name}_quantized", codes),
                  add_initializer(self.graph, f"{name}_scale", scale)]
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
        self.graph.insert_before(self._first(), node)
        return node.outputs[0]

    def qdq(self, value: ir.Value, scale: np.float32, zero_point: int, skip: set[str]) -> None:
        """Route ``value`` through Q→DQ for all its consumers but those named in ``skip``."""
        s = add_initializer(self.graph, f"{value.name}_scale", np.array(scale, np.float32))
        z = add_initializer(self.graph, f"{value.name}_zero_point", np.array(zero_point, np.uint8))
        q = ir.node("QuantizeLinear", [value, s, z], name=f"{value.name}_QuantizeLinear")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{value.name}_DequantizeLinear")
        q.outputs[0].name = f"{value.name}_quantized"
        q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
        out = dq.outputs[0]
        out.name = f"{value.name}_dequantized"
        out.type, out.shape = value.type, value.shape
        for use in list(value.uses()):
            if use.node is not q and use.node.name not in skip:
                use.node.replace_input_with(use.idx, out)
        if value.is_graph_output():
            outputs = self.graph.outputs
            i = next(k for k, v in enumerate(outputs) if v is value)
            name = value.name
            value.name = f"{name}_float"
            outputs[i] = out
            out.name = name
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(self._first(), [q, dq])
        else:
            self.graph.insert_after(producer, [q, dq])

    def _first(self) -> ir.Node:
        return next(iter(self.graph))


def _emit_layer(w: _Writer, node: ir.Node, layer: LayerPlan, plan: QuantPlan) -> None:
    grid = layer.grid
    if grid.storage == "int4":
        w_kn = layer.weight if grid.axis == 0 else layer.weight.T
        scale = block_scales(grid.scale, grid.block_size, w_kn.shape[0])
        codes = quantize(w_kn, scale, 0, grid.low, grid.qmax).astype(ml_dtypes.int4)
        node.replace_input_with(1, w.dq(layer.weight_name, codes, grid.scale.astype(np.float32), None,
                                        axis=0, block_size=grid.block_size))
        if grid.axis == 1:
            node.attributes["transB"] = ir.Attr("transB", ir.AttributeType.INT, 0)
        if layer.bias is not None:
            set_const(w.graph, node, 2, layer.bias.astype(np.float32), layer.bias_name)
        return
    s_w = grid.scale.astype(np.float32)
    codes = quantize(layer.weight, broadcast_channel(s_w, grid.axis, layer.weight.ndim), 0, grid.low, grid.qmax)
    node.replace_input_with(1, w.dq(layer.weight_name, codes.astype(np.int8), s_w,
                                    np.zeros(len(s_w), np.int8), axis=grid.axis))
    if layer.bias is not None and layer.activation_input:
        s_x = plan.act_params(layer.input_name)[0]
        s_b = (s_x * s_w).astype(np.float32)
        b_q = np.clip(np.rint(layer.bias / s_b), INT32.min, INT32.max).astype(np.int32)
        node.replace_input_with(2, w.dq(layer.bias_name, b_q, s_b, np.zeros(len(s_b), np.int32), axis=0))


def emit_model(fp32: ir.Model, plan: QuantPlan) -> ir.Model:
    """The QDQ model of ``plan`` over a copy of the fused graph ``fp32`` (which is left unchanged).

    Node names are kept, so a planned layer is found in the result by its name.
    """
    needed = 21 if any(l.grid.storage == "int4" for l in plan.layers.values()) else 13
    model = ir.serde.deserialize_model(_with_opset(ir.serde.serialize_model(fp32), needed))
    graph = model.graph
    nodes = {n.name: n for n in graph}
    writer = _Writer(graph)
    for name, layer in plan.layers.items():
        _emit_layer(writer, nodes[name], layer, plan)
    values = {v.name: v for n in graph for v in n.outputs} | {v.name: v for v in graph.inputs}
    float_input = {name for name, layer in plan.layers.items() if not layer.activation_input}
    for name, act in plan.activations.items():
        scale, zp = plan.act_params(name)
        if act.constant:
            init = graph.initializers[name]
            codes = quantize(init.const_value.numpy(), scale, zp, 0, act.qmax).astype(np.uint8)
            dq = writer.dq(name, codes, np.array(scale, np.float32), np.array(zp, np.uint8))
            for use in list(init.uses()):
                if use.node.name in plan.ops:
                    use.node.replace_input_with(use.idx, dq)
        else:
            writer.qdq(values[name], scale, zp, skip=float_input)
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
    return model


def output_model(state: CompileState) -> onnx.ModelProto:
    """The QDQ model of the current plan as the compile writes it, stamped with the options."""
    out = ir.serde.serialize_model(emit_model(state.model, state.plan))
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
