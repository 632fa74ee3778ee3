"""Probe: encodings of a 4-bit activation cap on int8 kernels, on a real model — latency and codes.

    python -m benchmarks.probe_caps [--example efficientnet_lite0] [--runs 30]

Compiles the example at W8A8 and at W4A4 (``--pipeline calibration``; the corrections do not change
the kernels). Each 4-bit tensor t of the W4A4 model is emitted as Q(s, z+240)→DQ→Add(0)→Q(s, z)→DQ
(``passes/emission.py``); the probe rewrites every such cap into the alternatives

* ``add0``      — as emitted (QLinearAdd with a constant 0);
* ``leakyrelu`` — LeakyRelu(α = 0 for z = 0, else 1) in place of the Add (QLinearLeakyRelu, a table);
* ``clip-u8``   — Q(s, z) → Clip(0, 15) on the uint8 codes → DQ (one pair, an integer Clip);
* ``merged``    — the two pairs back to back, nothing between them;

and reports, per variant, the latency at ORT_ENABLE_ALL on one thread as a ratio to the W8A8 model
(interleaved runs, one sample), the op types onnxruntime's optimizer leaves besides the integer
kernels, and the largest code any 4-bit tensor takes on the fused graph (15 when the cap holds).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx import helper

import onnxptq
from onnxptq import runtime
from onnxptq.latency import interleaved_latency
from onnxptq.simulate import fused_codes


def _rewrite(model: onnx.ModelProto, variant: str) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with every cap in ``variant`` form, and the names of the 4-bit code tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    by_output = {o: n for n in nodes for o in n.output}
    users = collections.defaultdict(list)
    for n in nodes:
        for i in n.input:
            users[i].append(n)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    codes, drop, add = [], set(), []
    for cap in [n for n in nodes if n.op_type == "Add" and n.name.endswith("_cap")]:
        dq1 = by_output[cap.input[0]]
        q1 = by_output[dq1.input[0]]
        (q2,) = users[cap.output[0]]
        codes.append(q2.output[0])
        if variant == "leakyrelu":
            alpha = 0.0 if int(inits[q2.input[2]]) == 0 else 1.0
            add.append(helper.make_node("LeakyRelu", [cap.input[0]], [cap.output[0]], name=cap.name, alpha=alpha))
            drop.add(cap.name)
        elif variant == "clip-u8":
            q1.input[2] = q2.input[2]
            bounds = [f"{cap.name}_lo", f"{cap.name}_hi"]
            out.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0, np.uint8), bounds[0]),
                                          onnx.numpy_helper.from_array(np.array(15, np.uint8), bounds[1])])
            add.append(helper.make_node("Clip", [q1.output[0], *bounds], [q2.output[0]], name=cap.name))
            drop.update({dq1.name, cap.name, q2.name})
        elif variant == "merged":
            q2.input[0] = cap.input[0]
            drop.add(cap.name)
    kept = [n for n in nodes if n.name not in drop] + add
    del out.graph.node[:]
    out.graph.node.extend(kept)
    model_ir = ir.serde.deserialize_model(out)
    common.TopologicalSortPass()(model_ir)
    return ir.serde.serialize_model(model_ir), codes


def _leftovers(model: onnx.ModelProto) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        runtime.session(model, threads=1, level="all", optimized_path=path)
        ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    return {op: n for op, n in sorted(ops.items()) if not op.startswith("QLinear") and op not in ("QGemm",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", default="efficientnet_lite0")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    ex = importlib.import_module(f"examples.{args.example}.example")
    fp32, calib = ex.fp32_model(), ex.calibration_set(32)
    w8 = onnxptq.compile(fp32, calib, pipeline="calibration").model
    w4 = onnxptq.compile(fp32, calib, w_bits=4, a_bits=4, pipeline="calibration").model
    feed = {k: v[:1] for k, v in calib.items()}
    sessions, facts = {"W8A8": runtime.session(w8, threads=1)}, {}
    for variant in ("add0", "leakyrelu", "clip-u8", "merged"):
        model, codes = _rewrite(w4, variant)
        sessions[variant] = runtime.session(model, threads=1)
        top = max(int(c.max()) for c in fused_codes(model, codes, feed).values())
        facts[variant] = (top, _leftovers(model))
    latency = interleaved_latency(sessions, feed, runs=args.runs)
    print(f"| {args.example} W4A4 cap | latency / W8A8 | largest 4-bit code | ops left besides integer kernels |\n"
          "|---|---|---|---|")
    for variant, (top, left) in facts.items():
        print(f"| {variant} | {latency[variant] / latency['W8A8']:.3f} | {top} | "
              f"{', '.join(f'{op}×{n}' for op, n in left.items())} |")


if __name__ == "__main__":
    main()
