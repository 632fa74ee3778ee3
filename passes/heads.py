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

with π the inverse of the permutation P₀‖P₁‖… (``passes/splitting.py``), so y equals the unsplit
layer's output column for column; a Gemm's parts keep its attributes and take their slices of B and C. Each part is
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
must hold the kinds of input the model is to see. Whether it shows which classes are never probable
is checked by the Good–Turing estimate in its incidence form: with N calibration positions, of which
Q₁ classes reach r ≥ 10⁻³ at exactly one, a new position brings about

    u = Q₁ / N

classes to 10⁻³ that no calibration position did. The head is split only where u ≤ ``MAX_UNSEEN``:
PP-OCRv4's 52 lines (2080 positions) give u = 0.012; magika's 52 files, one position each, give
u = 1.0 (each of 52 classes reaches 10⁻³ on one file only), and on its 1183 eval files 178 put a
class of the lowest band at p > 10⁻³ and 45 make one the argmax — split there, the program gave those
classes 2 or 3 bits at a price the eval files did not bear out (``benchmarks/results/results.md``,
session 23).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxptq import runtime
from onnxptq.graph import attr, const, consumers
from onnxptq.metrics import log_probabilities
from onnxptq.passes.candidates import budget_of
from onnxptq.passes.sensitivity import float_outputs
from onnxptq.passes.splitting import BYTE_BUDGETS, float_parameters, split_outputs
from onnxptq.state import CompileState

REACH_BANDS = (1e-3, 1e-1)  # band edges of a class's largest calibration probability
MIN_SHARE = 0.1  # of the model's float parameters: a smaller head is not worth two more nodes
MIN_NEVER = 0.5  # share of the classes that must be in the lowest band for a split
MAX_UNSEEN = 0.05  # Good–Turing: classes a new position brings to the lowest band's edge, at most


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


class Reach(NamedTuple):
    """A class head's evidence on the calibration set: r_c per class, and u (module doc)."""

    r: np.ndarray
    unseen: float


def unseen_rate(p: np.ndarray, edge: float = REACH_BANDS[0]) -> float:
    """u = Q₁ / N for probabilities ``p`` [N positions, classes]: Q₁ the classes that reach ``edge`` at
    exactly one position (the Good–Turing estimate, incidence form, of the classes a new position
    brings to ``edge`` that none of the N did)."""
    hits = (p >= edge).sum(axis=0)
    return float((hits == 1).sum() / len(p))


def reach(state: CompileState, outputs: list[str], normalized: list[bool]) -> list[Reach]:
    """Per output, r_c (the largest probability of class c over the calibration samples and positions)
    and u."""
    session = runtime.session(ir.serde.serialize_model(state.model), state.options.threads)
    scores = runtime.run_all(session, state.calib.batches(state.options.batch_size), outputs)
    found = []
    for s, kind in zip(scores, normalized):
        p = np.exp(log_probabilities(s, kind)).reshape(-1, s.shape[-1])
        found.append(Reach(p.max(axis=0), unseen_rate(p)))
    return found


class HeadSplitPass:
    name = "head-split"

    def run(self, state: CompileState) -> None:
        if budget_of(state.options) not in BYTE_BUDGETS:
            return
        graph = state.model.graph
        parameters = float_parameters(graph)
        heads = {name: head for name, head in class_heads(state.model).items()
                 if graph.node(name).inputs[1].const_value.size >= MIN_SHARE * parameters}
        if not heads:
            return
        outputs = sorted({out for out, _ in heads.values()})
        kinds = {out: kind for out, kind in heads.values()}
        reaches = dict(zip(outputs, reach(state, outputs, [kinds[o] for o in outputs])))
        for name, (output, _) in heads.items():
            r, unseen = reaches[output]
            band = np.digitize(r, REACH_BANDS)
            bands = [b for b in range(len(REACH_BANDS) + 1) if (band == b).any()]
            if len(bands) < 2 or (band == 0).mean() < MIN_NEVER:
                continue
            if unseen > MAX_UNSEEN:
                state.report.note(self.name, f"{name} left whole: the calibration set does not show which classes "
                                  f"are never probable (a new input would bring about {unseen:.2f} classes to "
                                  f"r ≥ {REACH_BANDS[0]:g} that no calibration input did; the split needs ≤ "
                                  f"{MAX_UNSEEN:g}): give more calibration samples of each kind of input")
                continue
            parts = split_outputs(graph, graph.node(name), [np.flatnonzero(band == b) for b in bands], "part")
            state.report.note(self.name, f"{name} → " + ", ".join(
                f"{part} ({int((band == b).sum())} classes, {_band(b)})" for part, b in zip(parts, bands))
                + ", r the largest probability of a class on the calibration set")


def _band(b: int) -> str:
    """Band ``b`` of ``REACH_BANDS`` as an inequality on r."""
    edges = (0.0, *REACH_BANDS, 1.0)
    if b == 0:
        return f"r < {edges[1]:g}"
    return f"r ≥ {edges[b]:g}" if b == len(REACH_BANDS) else f"{edges[b]:g} ≤ r < {edges[b + 1]:g}"
