"""A layer that holds most of the model's weights, split into groups of output channels so that a byte
budget can give part of it fewer bits.

Mixed precision gives each layer one width, so the sizes it can reach step by each layer's share of
the weights. magika's Conv holds 84% of them: between its uniform packed 4-bit file (0.1308× of fp32)
and a 0.13× budget the program could only take the whole Conv, the whole head or its embedding below
4 bits, each far coarser than the 2.5 kB it had to find, and nothing left to buy the 8-bit byte
embedding that brings the outputs nearest fp32. In 8 groups, round to nearest at 0.13× takes two of
them to 3 bits and the embedding to 8: against uniform 4-bit a tie (nearer fp32 on 611 of 1183 eval
files against 572) where the whole Conv at 3 bits lost (513 : 668; ``benchmarks/results/results.md``,
session 23).

Under a byte budget (``--size-ratio``, ``--max-drop``) a Conv (ungrouped), Gemm or MatMul with a
constant weight holding at least ``MIN_SHARE`` of the model's float parameters is split into ``GROUPS``
layers of consecutive output channels, y = Concat(f(x; W[G₀]), f(x; W[G₁]), …) along the channel axis
(``passes/splitting.py``): each group is a row of the program, priced and given bits on its own. A
class head is split by class reach instead (``passes/heads.py``), and a layer whose groups' one-bit
step, n / 8 bytes for n weights, would not pay for the 3-bit unpacking function the file then holds
(``costs.SHARED_BYTES``) is left whole. Each group brings its own nodes and output grid: on magika
3.4 kB in all for 8 groups, which the program counts in the rest of the file.

Consecutive channels, not channels ranked by sensitivity: priced one at a time at 3 bits (the others
at 4) on magika's 52 calibration files, a quarter of its 512 Conv channels lower the distance to fp32,
and the channels called cheapest raise the eval distance more than as many drawn at random, at every
fraction (``python -m benchmarks.channel_ranks magika``, ``benchmarks/results/results.md`` session 17).
A channel's place in a trained layer is arbitrary, so consecutive groups are groups drawn at random,
and each group's ΔL is measured whole.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxptq.costs import SHARED_BYTES
from onnxptq.graph import attr, const, weight_channel_axis
from onnxptq.passes.candidates import budget_of
from onnxptq.passes.heads import class_heads
from onnxptq.passes.splitting import BYTE_BUDGETS, SPLIT_OPS, float_parameters, split_outputs
from onnxptq.state import CompileState

MIN_SHARE = 0.25  # of the model's float parameters
GROUPS = 8
MIN_GROUP = 8 * SHARED_BYTES["int3-cast"]  # weights of a group whose 4 → 3-bit step saves the function's bytes


def dominant_layers(model: ir.Model) -> list[ir.Node]:
    """The layers ``LayerGroupPass`` splits: ops of ``SPLIT_OPS`` but class heads whose constant weight
    (2-D for a matrix product, an ungrouped Conv's) holds at least ``MIN_SHARE`` of the float
    parameters, ``GROUPS`` output channels and ``GROUPS`` groups of more than ``MIN_GROUP`` weights."""
    parameters, heads = float_parameters(model.graph), class_heads(model)
    found = []
    for node in model.graph:
        w = const(node.inputs[1]) if node.op_type in SPLIT_OPS and len(node.inputs) > 1 and node.name not in heads \
            else None
        if w is None or w.size < MIN_SHARE * parameters or w.shape[weight_channel_axis(node)] < GROUPS \
                or w.size <= GROUPS * MIN_GROUP:
            continue
        if (node.op_type == "Conv" and attr(node, "group", 1) == 1) or (node.op_type != "Conv" and w.ndim == 2):
            found.append(node)
    return found


class LayerGroupPass:
    name = "layer-groups"

    def run(self, state: CompileState) -> None:
        if budget_of(state.options) not in BYTE_BUDGETS:
            return
        graph = state.model.graph
        for node in dominant_layers(state.model):
            channels = const(node.inputs[1]).shape[weight_channel_axis(node)]
            groups = split_outputs(graph, node, np.array_split(np.arange(channels), GROUPS), "group")
            state.report.note(self.name, f"{node.name} → {len(groups)} layers of {channels // GROUPS}"
                              f"{'' if channels % GROUPS == 0 else '–' + str(-(-channels // GROUPS))} output channels "
                              f"({groups[0]} … {groups[-1]}), each given its own bits")
