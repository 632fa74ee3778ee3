"""A softmax spelled out in elementary ops, written back as one Softmax node.

Exporters such as jax2tf write softmax(z) over the last axis as

    m = B(ReduceMax(z))            (optionally Max(c, ·) with a scalar constant c)
    e = Exp(z − m)
    y = e / B(ReduceSum(e))

where B is a chain of Reshape / Expand / Unsqueeze / Squeeze / Identity that broadcasts the per-row
value back along the classes. Any m constant along the last axis gives the same y (it cancels in the
ratio), so the graph computes y = Softmax(z, axis = −1) however m is bounded. Written as a Softmax,
the output is recognized as class probabilities: mixed precision prices layers by KL instead of
1 − cosine, and a class head before it can be split by how probable its classes are
(``passes/heads.py``). magika's output is such a softmax; onnxruntime runs the one node in place of
ten.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxptq.graph import attr, const, consumers

_BROADCAST = {"Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity"}


def _reduced_over_last(node: ir.Node, rank: int) -> bool:
    """Whether the Reduce* ``node`` reduces exactly the last of ``rank`` axes (axes as attribute before
    opset 18 for ReduceMax, 13 for ReduceSum; as an input after)."""
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = const(node.inputs[1])
    if axes is None:
        return False
    return [int(a) % rank for a in np.ravel(axes)] == [rank - 1]


def _through_broadcast(value: ir.Value) -> ir.Node | None:
    """The first producer up from ``value`` that is not a broadcast op, following data inputs; each
    value on the way must have no other consumer."""
    node = value.producer()
    while node is not None and node.op_type in _BROADCAST and node.domain == "":
        if len(consumers(node.outputs[0])) != 1 or node.outputs[0].is_graph_output():
            return None
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and (len(consumers(node.outputs[0])) != 1 or node.outputs[0].is_graph_output()):
        return None
    return node


def _row_max_of(node: ir.Node | None, z: ir.Value, rank: int) -> bool:
    """Whether ``node`` computes the row maximum of ``z`` over the last axis, optionally bounded by a
    scalar constant (Max(c, ReduceMax(z)))."""
    if node is not None and node.op_type == "Max" and len(node.inputs) == 2:
        scalars = [v for v in node.inputs if (c := const(v)) is not None and c.size == 1]
        others = [v for v in node.inputs if v not in scalars]
        if len(scalars) != 1 or len(others) != 1 or others[0].producer() is None:
            return False
        node = others[0].producer()
        if len(consumers(node.outputs[0])) != 1:
            return False
    return node is not None and node.op_type == "ReduceMax" and node.inputs[0] is z and _reduced_over_last(node, rank)


def _softmax_input(div: ir.Node) -> ir.Value | None:
    """z if ``div`` is the spelled-out softmax of z over its last axis (module doc), else None."""
    if div.op_type != "Div" or div.domain != "" or len(div.inputs) != 2:
        return None
    e, s = div.inputs
    exp = e.producer() if e is not None else None
    if exp is None or exp.op_type != "Exp" or exp.domain != "" or e.is_graph_output():
        return None
    users = consumers(e)
    total = _through_broadcast(s)
    if len(users) != 2 or total is None or total.op_type != "ReduceSum" or total.inputs[0] is not e \
            or {id(u) for u in users} != {id(div), id(total)}:
        return None
    sub = exp.inputs[0].producer()
    if sub is None or sub.op_type != "Sub" or len(consumers(sub.outputs[0])) != 1 or sub.outputs[0].is_graph_output():
        return None
    z, m = sub.inputs
    rank = z.shape.rank() if z is not None and z.shape is not None else None
    if rank is None or not _reduced_over_last(total, rank) or not _row_max_of(_through_broadcast(m), z, rank):
        return None
    return z


def fuse_softmax(graph: ir.Graph, opset: int) -> int:
    """Replace every spelled-out softmax in ``graph`` by a Softmax node (opset ≥ 13, whose Softmax
    normalizes the given axis alone); the output value keeps its name. Returns how many."""
    if opset < 13:
        return 0
    fused = 0
    for div in list(graph):
        z = _softmax_input(div)
        if z is None:
            continue
        y = div.outputs[0]
        softmax = ir.node("Softmax", [z], {"axis": -1}, name=div.name)
        graph.insert_before(div, softmax)
        name = y.name
        y.replace_all_uses_with(softmax.outputs[0], replace_graph_outputs=True)
        softmax.outputs[0].name, softmax.outputs[0].shape, softmax.outputs[0].type = name, y.shape, y.type
        graph.remove(div, safe=True)
        fused += 1
    return fused
