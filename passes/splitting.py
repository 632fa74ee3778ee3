"""One weighted layer rewritten as several, each computing a set of its output channels, so that mixed
precision can give each set its own bits (``passes/heads.py``, ``passes/groups.py``).

For a layer y = f(x; W, b) whose output channel c reads only column c of W (row c of a Conv's weight or
of a Gemm's transposed B) and element c of b, and index sets P₀, P₁, … that partition the channels:

    y = Gather(Concat(f(x; W[P₀], b[P₀]), f(x; W[P₁], b[P₁]), …, axis = a), π, axis = a)

with a the output's channel axis and π the inverse of the permutation P₀‖P₁‖… (stored int32); where
P₀‖P₁‖… is already 0, 1, …, C − 1 the Gather is left out. A bias of one value for every channel goes
whole to each part; every other attribute is kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxptq.graph import add_initializer, const, weight_channel_axis
from onnxptq.passes.layer_moments import output_channel_axis

SPLIT_OPS = ("Conv", "Gemm", "MatMul")
BYTE_BUDGETS = ("size_ratio", "max_drop")  # the budgets under which a split can pay


def float_parameters(graph: ir.Graph) -> int:
    """How many float32 values the graph's initializers hold (a layer's share is of this)."""
    return sum(v.const_value.size for v in graph.initializers.values()
               if v.const_value is not None and v.dtype == ir.DataType.FLOAT)


def split_outputs(graph: ir.Graph, node: ir.Node, parts: list[np.ndarray], label: str) -> list[str]:
    """Replace ``node`` (an op of ``SPLIT_OPS`` with a constant weight) by one node per index set of
    ``parts``, named ``{node}_{label}{g}``, joined back in channel order (module doc); returns the new
    layers' names. The unsplit weight and a sliced bias leave the graph's initializers."""
    w = const(node.inputs[1])
    axis = weight_channel_axis(node)
    bias = const(node.inputs[2]) if node.op_type != "MatMul" and len(node.inputs) > 2 else None
    sliced = bias is not None and bias.ndim >= 1 and bias.shape[-1] == w.shape[axis]
    out = node.outputs[0]
    nodes = []
    for g, index in enumerate(parts):
        inputs = [node.inputs[0], add_initializer(graph, f"{node.inputs[1].name}_{label}{g}",
                                                  np.ascontiguousarray(np.take(w, index, axis=axis)))]
        if sliced:
            inputs.append(add_initializer(graph, f"{node.inputs[2].name}_{label}{g}",
                                          np.ascontiguousarray(np.take(bias, index, axis=-1))))
        elif bias is not None:
            inputs.append(node.inputs[2])
        part = ir.node(node.op_type, inputs, {k: a.value for k, a in node.attributes.items()},
                       name=f"{node.name}_{label}{g}")
        part.outputs[0].name = f"{out.name}_{label}{g}"
        part.outputs[0].type = out.type
        nodes.append(part)
    order = np.concatenate(parts)
    concat = ir.node("Concat", [p.outputs[0] for p in nodes], {"axis": output_channel_axis(node)}, name=f"{node.name}_joined")
    concat.outputs[0].name, concat.outputs[0].type = f"{out.name}_joined", out.type
    added = [*nodes, concat]
    if not np.array_equal(order, np.arange(len(order))):
        inverse = add_initializer(graph, f"{node.name}_channel_order", np.argsort(order).astype(np.int32))
        added.append(ir.node("Gather", [concat.outputs[0], inverse], {"axis": output_channel_axis(node)},
                             name=f"{node.name}_channels"))
    replaced = [v for v in node.inputs[1:] if v is not None]
    ir.convenience.replace_nodes_and_values(graph, node, [node], added, [out], added[-1].outputs)
    for value in replaced:  # the unsplit weight (and bias, if each part took a slice) no node reads now
        if not value.uses() and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
    return [part.name for part in nodes]
