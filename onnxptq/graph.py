"""Small onnx-ir helpers shared by the passes: constants, attributes, new initializers."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir


def const(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer) input, or None for a computed or absent one."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def attr(node: ir.Node, name: str, default=None):
    """An attribute's Python value, or ``default`` when the node does not set it."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def weight_channel_axis(node: ir.Node) -> int:
    """The axis of a Conv's, Gemm's or MatMul's weight (input 1) along which its output channels lie:
    0 for a Conv ([M, C/g, …]) and a transB Gemm ([N, K]), else 1 ([K, N])."""
    return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)) else 1


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer under a name not yet used in ``graph``."""
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    unique, k = name, 1
    while unique in taken:
        unique, k = f"{name}_{k}", k + 1
    # onnx-ir 1.1 knows INT2 but cannot infer it from an ml_dtypes.int2 array: named explicitly
    if array.dtype == ml_dtypes.int2:
        tensor = ir.Tensor(array, dtype=ir.DataType.INT2, name=unique)
    else:
        tensor = ir.tensor(array, name=unique)
    value = ir.Value(name=unique, const_value=tensor)
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value


def set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> ir.Value:
    """Make input ``index`` of ``node`` the constant ``array``.

    Rewrites the initializer in place when this node is its only user, otherwise gives the node a
    fresh initializer, so other users of a shared weight keep its old value.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_initializer() and len(old.uses()) == 1:
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return old
    new = add_initializer(graph, name, array)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    return new


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct consumer nodes of ``value`` in first-use order."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())
