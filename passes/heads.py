"""Class heads split by how probable each class is on the calibration set, so that mixed precision can
give the classes the data never makes probable fewer bits than the ones it does.

A *class head* is a weighted layer (Gemm, or MatMul with a constant 2-D weight) whose output channel c
is class c of a graph output of class scores: the layer's output is the output (logits), or reaches
it through an Add of a constant bias over the last axis and a Softmax over the last axis (one spelled
out in elementary ops, as magika's, is one Softmax after fusion: ``passes/softmax.py``). Class c's
*reach* is the largest probability the fp32 model gives it on the calibration set,
r_c = max over samples and positions of softmax(z)_c. A class that stays improbable never competes
for the argmax, so the error its weight column takes barely moves the output: in PP-OCRv4's
recognizer head (6625 classes, 30% of the weights; 82 reach r_c ≥ 10⁻³ on 64 English lines), of
the uniform 4-bit model (int8 codes), the 98% of columns with the smallest reach re-rounded to 2 bits
leave fp32 top-1 agreement and KL where they were (0.859, 0.463), while 90% chosen at random lose 0.015
of agreement (KL 0.509) and all of them 0.016 (0.513) (``python -m benchmarks.head_reach ppocr_rec``).

Under a byte budget (``--size-ratio``, ``--max-drop``) a head holding at least ``MIN_SHARE`` of the
model's float parameters (PP-OCRv4's and EfficientNet-Lite0's hold 30% and 28%) whose classes fall in
more than one band of reach — [0, 10⁻³), [10⁻³, 10⁻¹), [10⁻¹, 1] — with at least ``MIN_NEVER`` of
them in the lowest, is split into one layer per band, P₀, P₁, … the band's classes in ascending order:

    y = Gather(Concat(x·W[:, P₀], x·W[:, P₁], …, axis = −1), π, axis = −1)

with π the inverse of the permutation P₀‖P₁‖… (stored int32), so y equals the unsplit layer's output
column for column; a Gemm's parts keep its attributes and take their slices of B and C. Each part is
a layer of the plan: the program prices and chooses its bits on its own, and a part at 4 bits can be
a MatMulNBits while another is an integer-input kernel (the parts read one input; each reads it as
its encoding needs).

Where the never-probable classes are not the bulk of the head there is little to gain:
EfficientNet-Lite0's 1000 ImageNet classes on 52 calibration photos fall 438 / 543 / 19 into the
bands, the two large parts measured nearly the same ΔL per byte saved (4 → 3 bits: 0.016 and 0.019
per MB), and the program gave all three 3 bits, as it gave the whole head (at 0.13× the extra nodes
and index only shifted the program among near-ties elsewhere: fp32 top-1 agreement 0.635 against
0.692 unsplit, KL 0.234 against 0.247).

A class the calibration set never makes probable is priced as free to coarsen: the calibration set
must hold the kinds of input the model is to see.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxptq import runtime
from onnxptq.graph import add_initializer, attr, const, consumers
from onnxptq.metrics import log_probabilities
from onnxptq.passes.candidates import budget_of
from onnxptq.passes.sensitivity import float_outputs
from onnxptq.state import CompileState

REACH_BANDS = (1e-3, 1e-1)  # band edges of a class's largest calibration probability
MIN_SHARE = 0.1  # of the model's float parameters: a smaller head is not worth two more nodes
MIN_NEVER = 0.5  # share of the classes that must be in the lowest band for a split
BYTE_BUDGETS = ("size_ratio", "max_drop")


def _last_axis(node: ir.Node, rank: int | None, opset: int) -> bool:
    """Whether Softmax ``node`` normalizes over the last axis alone (before opset 13 its default axis is
    1 and it normalizes over every axis from there on)."""
    axis = attr(node, "axis", -1 if opset >= 13 else 1)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _bias_over_classes(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``node`` is an Add of ``value`` and a constant that varies along the last axis only."""
    if node.op_type != "Add" or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    bias = const(other)
    return bias is not None and bias.ndim >= 1 and int(np.prod(bias.shape[:-1])) == 1


def class_heads(model: ir.Model) -> dict[str, tuple[str, bool]]:
    """Head node name → (graph output, whether that output holds probabilities rather than logits)."""
    heads = {}
    for name, normalized in zip(*float_outputs(model)):
        if normalized is None:
            continue
        value = next(v for v in model.graph.outputs if v.name == name)
        node = value.producer()
        if normalized:  # a Softmax over the classes, after an optional bias
            if node.op_type != "Softmax" or not _last_axis(node, value.shape.rank() if value.shape else None,
                                                           model.opset_imports.get("", 1)):
                continue
            value = node.inputs[0]
            node = value.producer()
            if node is not None and len(consumers(value)) == 1 and not value.is_graph_output() \
                    and node.op_type == "Add":
                inner = next((v for v in node.inputs if const(v) is None), None)
                if inner is None or not _bias_over_classes(node, inner):
                    continue
                value, node = inner, inner.producer()
        if node is None or len(consumers(value)) > (0 if value.is_graph_output() else 1):
            continue
        weight = const(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim != 2 or attr(node, "transA", 0) or \
                node.op_type not in ("Gemm", "MatMul"):
            continue
        heads[node.name] = (name, bool(normalized))
    return heads


def reach(state: CompileState, outputs: list[str], normalized: list[bool]) -> list[np.ndarray]:
    """Per output, r_c: the largest probability of class c over the calibration samples and positions."""
    session = runtime.session(ir.serde.serialize_model(state.model), state.options.threads)
    scores = runtime.run_all(session, state.calib.batches(state.options.batch_size), outputs)
    return [np.exp(log_probabilities(s, kind)).reshape(-1, s.shape[-1]).max(axis=0)
            for s, kind in zip(scores, normalized)]


def split_head(graph: ir.Graph, node: ir.Node, parts: list[np.ndarray]) -> list[str]:
    """Replace ``node`` by one layer per index set of ``parts`` (output channels), their outputs joined
    and put back in channel order (module doc); returns the parts' node names."""
    w = const(node.inputs[1])
    columns = 0 if node.op_type == "Gemm" and attr(node, "transB", 0) else 1
    bias = const(node.inputs[2]) if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    # a C broadcast along the classes (one value for all) goes whole to every part
    sliced = bias is not None and bias.ndim >= 1 and bias.shape[-1] == w.shape[columns]
    out = node.outputs[0]
    nodes = []
    for g, index in enumerate(parts):
        inputs = [node.inputs[0], add_initializer(graph, f"{node.inputs[1].name}_part{g}",
                                                  np.ascontiguousarray(np.take(w, index, axis=columns)))]
        if sliced:
            inputs.append(add_initializer(graph, f"{node.inputs[2].name}_part{g}",
                                          np.ascontiguousarray(np.take(bias, index, axis=-1))))
        elif bias is not None:
            inputs.append(node.inputs[2])
        part = ir.node(node.op_type, inputs, {k: a.value for k, a in node.attributes.items()},
                       name=f"{node.name}_part{g}")
        part.outputs[0].name = f"{out.name}_part{g}"
        part.outputs[0].type = out.type
        nodes.append(part)
    order = np.concatenate(parts)
    concat = ir.node("Concat", [p.outputs[0] for p in nodes], {"axis": -1}, name=f"{node.name}_joined")
    concat.outputs[0].name, concat.outputs[0].type = f"{out.name}_joined", out.type
    inverse = add_initializer(graph, f"{node.name}_class_order", np.argsort(order).astype(np.int32))
    gather = ir.node("Gather", [concat.outputs[0], inverse], {"axis": -1}, name=f"{node.name}_classes")
    ir.convenience.replace_nodes_and_values(graph, node, [node], [*nodes, concat, gather], [out], gather.outputs)
    return [part.name for part in nodes]


class HeadSplitPass:
    name = "head-split"

    def run(self, state: CompileState) -> None:
        if budget_of(state.options) not in BYTE_BUDGETS:
            return
        graph = state.model.graph
        parameters = sum(v.const_value.size for v in graph.initializers.values()
                         if v.const_value is not None and v.dtype == ir.DataType.FLOAT)
        heads = {name: head for name, head in class_heads(state.model).items()
                 if graph.node(name).inputs[1].const_value.size >= MIN_SHARE * parameters}
        if not heads:
            return
        outputs = sorted({out for out, _ in heads.values()})
        kinds = {out: kind for out, kind in heads.values()}
        reaches = dict(zip(outputs, reach(state, outputs, [kinds[o] for o in outputs])))
        for name, (output, _) in heads.items():
            r = reaches[output]
            band = np.digitize(r, REACH_BANDS)
            bands = [b for b in range(len(REACH_BANDS) + 1) if (band == b).any()]
            if len(bands) < 2 or (band == 0).mean() < MIN_NEVER:
                continue
            parts = split_head(graph, graph.node(name), [np.flatnonzero(band == b) for b in bands])
            common.RemoveUnusedNodesPass()(state.model)  # the unsplit weight
            state.report.note(self.name, f"{name} → " + ", ".join(
                f"{part} ({int((band == b).sum())} classes, {_band(b)})" for part, b in zip(parts, bands))
                + ", r the largest probability of a class on the calibration set")


def _band(b: int) -> str:
    """Band ``b`` of ``REACH_BANDS`` as an inequality on r."""
    edges = (0.0, *REACH_BANDS, 1.0)
    if b == 0:
        return f"r < {edges[1]:g}"
    return f"r ≥ {edges[b]:g}" if b == len(REACH_BANDS) else f"{edges[b]:g} ≤ r < {edges[b + 1]:g}"
