"""Would a split layer cost fewer bytes, and lose less, written back as one node?

    python -m benchmarks.join_groups IN.onnx OUT.onnx

A diagnostic for ``passes/groups.py``, whose groups each bring their own Conv, weight-scale and bias
nodes and output grid (3.4 kB on magika's 8 groups). Reads an emitted QDQ model and rewrites each
Concat whose inputs all come from a Conv through its own QuantizeLinear → DequantizeLinear (the groups
of one split Conv, sharing their input) into a single Conv:

    codes = Concat(codes_g),  s_w = Concat(s_w,g),  bias = Concat(bias_g),  s_b = Concat(s_b,g)   (axis 0)
    y = Conv(x, DQ(codes, s_w), DQ(bias, s_b)),   then one Q/DQ on the range ∪_g [−z_g·s_g, (255 − z_g)·s_g]

Each group's codes stay in their own storage (a Cast of int4, the int3 unpacking function): onnxruntime
folds the Concat of constants at load and fuses one QLinearConv. The price is one output grid for all
groups instead of one each. Prints the file bytes before and after; measure the result with
``python -m benchmarks.paired``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _joined_groups(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """(Concat, [Conv per input]) for every Concat fed only by Q → DQ after a Conv, all on one input."""
    producer = {out: node for node in graph.node for out in node.output}

    def conv_of(value: str) -> onnx.NodeProto | None:
        dq = producer.get(value)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        conv = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        return conv if conv is not None and conv.op_type == "Conv" and len(conv.input) == 3 else None

    found = []
    for node in graph.node:
        convs = [conv_of(v) for v in node.input] if node.op_type == "Concat" else []
        if len(convs) > 1 and all(convs) and len({c.input[0] for c in convs}) == 1:
            found.append((node, convs))
    return found


def join_groups(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place (module doc); returns how many split Convs were joined."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    groups = _joined_groups(graph)
    for k, (concat, convs) in enumerate(groups):
        outputs = [producer[producer[v].input[0]] for v in concat.input]  # each group's QuantizeLinear
        lo = min(-int(values[q.input[2]]) * float(values[q.input[1]]) for q in outputs)
        hi = max((255 - int(values[q.input[2]])) * float(values[q.input[1]]) for q in outputs)
        scale = np.float32((hi - lo) / 255)
        zero = np.uint8(np.clip(round(-lo / scale), 0, 255))
        weights = [producer[c.input[1]] for c in convs]
        biases = [producer[c.input[2]] for c in convs]
        p = f"joined{k}_"
        conv = helper.make_node("Conv", [convs[0].input[0], p + "w", p + "b"], [p + "y"],
                                name=re.sub(r"_group0$", "", convs[0].name))
        conv.attribute.extend(convs[0].attribute)
        new = [helper.make_node("Concat", [d.input[i] for d in dqs], [p + name], axis=0)
               for dqs, names in ((weights, ("codes", "ws")), (biases, ("bias", "bs"))) for i, name in enumerate(names)]
        new += [helper.make_node("DequantizeLinear", [p + "codes", p + "ws"], [p + "w"], axis=0),
                helper.make_node("DequantizeLinear", [p + "bias", p + "bs"], [p + "b"], axis=0), conv,
                helper.make_node("QuantizeLinear", [p + "y", p + "s", p + "z"], [p + "q"]),
                helper.make_node("DequantizeLinear", [p + "q", p + "s", p + "z"], [concat.output[0]])]
        graph.initializer.extend([numpy_helper.from_array(np.array(scale), p + "s"),
                                  numpy_helper.from_array(np.array(zero), p + "z")])
        dropped = {id(n) for n in [concat, *convs, *weights, *biases, *outputs,
                                   *(producer[v] for v in concat.input)]}
        nodes = list(graph.node)
        at = nodes.index(convs[0])  # every input of the new nodes is produced before the first group
        kept = [n for n in nodes[:at] if id(n) not in dropped] + new + [n for n in nodes[at:] if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        producer = {out: node for node in graph.node for out in node.output}
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    model = onnx.load(args.source)
    joined = join_groups(model)
    onnx.checker.check_model(model)
    onnx.save(model, args.target)
    print(f"{joined} split Conv(s) joined: {args.source.stat().st_size} → {args.target.stat().st_size} bytes")


if __name__ == "__main__":
    main()
