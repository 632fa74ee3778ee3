"""Fusion: bring the float graph into the form the later passes plan over.

1. Constant nodes become initializers (PP-OCR models keep every weight in a Constant node).
2. Constant subgraphs are folded (onnxscript's constant folder) and dead nodes removed.
3. BatchNormalization is folded into the Conv / ConvTranspose / Gemm that feeds it. With
   a_c = γ_c / √(σ²_c + ε), the folded layer is W'_c = a_c·W_c and b'_c = a_c·(b_c − μ_c) + β_c, exactly
   the same function; (γ, β, μ, σ², ε) are kept in the plan, for BN re-estimation. A BN whose
   producer has other consumers, or whose parameters are not constants, stays a node.
4. A rank-2 MatMul with a constant weight followed by an Add of a constant [N] bias becomes a Gemm:
   onnxruntime would otherwise fuse the pair into a float Gemm (MatMulAddFusion) before its QDQ
   fusions see them, and the layer would run in float; as a Gemm it runs on QGemm with an int32 bias.
5. A softmax spelled out in elementary ops (ReduceMax, Sub, Exp, ReduceSum, Div) becomes one Softmax
   node (``passes/softmax.py``), so the output is seen as class probabilities.
6. Range-bounding activations are noted: Relu bounds its output to [0, ∞), Clip to [min, max];
   calibration clips the grid to that bound, which also lets onnxruntime drop the op.
7. Every node and value gets a unique name (verification maps planned layers to fused kernels by
   node name) and shapes/types are inferred.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from onnxptq.graph import add_initializer, attr, const, consumers, set_const
from onnxptq.plan import FoldedBN
from onnxptq.passes.softmax import fuse_softmax
from onnxptq.state import CompileState

FOLDABLE = {"Conv", "ConvTranspose", "Gemm"}


def _scaled_weight(node: ir.Node, w: np.ndarray, a: np.ndarray) -> np.ndarray | None:
    """W' with output channel c multiplied by a_c, or None if the layout is not understood.

    Conv W is [C_out, C_in/g, k…]; Gemm B is [N, K] (transB=1) or [K, N]; ConvTranspose W is
    [C_in, C_out/g, k…], where output channel c = j·C_out/g + i of group j is W[j·C_in/g : (j+1)·C_in/g, i].
    """
    if node.op_type == "Conv":
        return w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or w.ndim != 2:
            return None
        return w * (a[:, None] if attr(node, "transB", 0) else a[None, :])
    if node.op_type == "ConvTranspose":
        g = attr(node, "group", 1)
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w.reshape((g, cin // g, cout_g) + w.shape[2:])
        scale = a.reshape((g, 1, cout_g) + (1,) * (w.ndim - 2))
        return (grouped * scale).reshape(w.shape)
    return None


def _fold_one(graph: ir.Graph, bn: ir.Node, plan_bn: dict[str, FoldedBN]) -> bool:
    x = bn.inputs[0]
    layer = x.producer() if x is not None else None
    if layer is None or layer.op_type not in FOLDABLE or len(consumers(x)) != 1 or x.is_graph_output():
        return False
    if attr(bn, "training_mode", 0) or len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
        return False
    params = [const(v) for v in bn.inputs[1:5]]
    w = const(layer.inputs[1])
    if w is None or any(p is None for p in params):
        return False
    if layer.op_type == "Gemm" and (attr(layer, "alpha", 1.0) != 1.0 or attr(layer, "beta", 1.0) != 1.0):
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = float(attr(bn, "epsilon", 1e-5))
    a = gamma / np.sqrt(var + eps)
    w_new = _scaled_weight(layer, w.astype(np.float64), a)
    if w_new is None:
        return False
    b = const(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2] is not None else None
    if len(layer.inputs) > 2 and layer.inputs[2] is not None and b is None:
        return False
    b = np.zeros_like(a) if b is None else b.astype(np.float64)
    if b.shape != a.shape:
        return False
    set_const(graph, layer, 1, w_new.astype(np.float32), f"{layer.name}_W")
    set_const(graph, layer, 2, (a * (b - mean) + beta).astype(np.float32), f"{layer.name}_B")
    plan_bn[layer.name] = FoldedBN(params[0].astype(np.float32), params[1].astype(np.float32),
                                   params[2].astype(np.float32), params[3].astype(np.float32), eps)
    y = bn.outputs[0]
    name = y.name
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    if x.is_graph_output():
        x.name = name
    return True


def _gemm_from_matmul_add(graph: ir.Graph, mm: ir.Node) -> bool:
    """Rewrite MatMul(x, W) + b as Gemm(x, W, b) when x is rank 2, W a constant [K, N], b a constant [N]
    (or [1, N]) and the Add is the MatMul's only consumer."""
    x, w_v = mm.inputs[0], mm.inputs[1]
    w = const(w_v)
    y = mm.outputs[0]
    users = consumers(y)
    if w is None or w.ndim != 2 or x is None or x.shape is None or len(x.shape) != 2 or len(users) != 1 \
            or y.is_graph_output() or users[0].op_type != "Add" or users[0].domain != "":
        return False
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    b = const(other)
    if b is None or b.dtype != np.float32 or b.size != w.shape[1] or b.shape[-1] != w.shape[1] or b.ndim > 2:
        return False
    bias = add_initializer(graph, f"{mm.name}_B", b.reshape(-1))
    gemm = ir.node("Gemm", inputs=[x, w_v, bias], name=mm.name)
    graph.insert_before(add, gemm)
    out = add.outputs[0]
    name = out.name
    out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
    gemm.outputs[0].name, gemm.outputs[0].shape, gemm.outputs[0].type = name, out.shape, out.type
    graph.remove([add, mm], safe=True)
    return True


def _bounds(node: ir.Node) -> tuple[float, float] | None:
    """[lo, hi] an activation node bounds its output to, or None (opset < 11 Clip uses attributes)."""
    if node.op_type == "Relu":
        return (0.0, np.inf)
    if node.op_type != "Clip":
        return None
    if "min" in node.attributes or "max" in node.attributes:
        lo, hi = attr(node, "min"), attr(node, "max")
    else:
        lo_v, hi_v = (list(node.inputs) + [None, None])[1:3]
        lo, hi = const(lo_v), const(hi_v)
        if (lo_v is not None and lo is None) or (hi_v is not None and hi is None):
            return None
    return (-np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))


class FusionPass:
    name = "fusion"

    def run(self, state: CompileState) -> None:
        model = state.model
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        onnxscript.optimizer.fold_constants(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.RemoveUnusedNodesPass()(model)
        common.NameFixPass()(model)
        graph = model.graph
        common.ShapeInferencePass()(model)
        gemms = sum(_gemm_from_matmul_add(graph, node) for node in list(graph)
                    if node.op_type == "MatMul" and node.domain == "")
        softmaxes = fuse_softmax(graph, model.opset_imports.get("", 1))
        if softmaxes:
            common.RemoveUnusedNodesPass()(model)  # the spelled-out ops
        folded = 0
        for node in list(graph):
            if node.op_type == "BatchNormalization" and node.domain == "":
                folded += _fold_one(graph, node, state.plan.folded_bn)
        for node in graph:
            bound = _bounds(node)
            if bound is not None:
                state.plan.bounds[node.outputs[0].name] = bound
        common.ShapeInferencePass()(model)
        common.TopologicalSortPass()(model)
        left = sum(1 for n in graph if n.op_type == "BatchNormalization")
        state.report.note(self.name, f"{folded} BatchNormalization folded" + (f", {left} left as nodes" if left else "")
                          + (f", {gemms} MatMul+Add rewritten as Gemm" if gemms else "")
                          + (f", {softmaxes} spelled-out softmax written as Softmax" if softmaxes else ""))
