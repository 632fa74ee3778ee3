"""Probe: encodings of a 4-bit activation cap on int8 kernels, on a real model — latency and codes.

    python -m benchmarks.probe_caps [--example efficientnet_lite0] [--runs 30]

Compiles the example at W8A8 and at W4A4 (``--pipeline calibration``; the corrections do not change
the kernels). Each 4-bit tensor t of the W4A4 model is emitted as Q(s, z) → Clip(0, 15) → DQ(s, z) on
the uint8 codes (``passes/emission.py``); the probe rewrites every such cap into the alternatives

* ``clip-u8``   — as emitted;
* ``add0``      — Q(s, z+240) → DQ → Add(0) → Q(s, z) → DQ (a QLinearAdd between two pairs);
* ``leakyrelu`` — the same with LeakyRelu(α = 0 for z = 0, else 1) (a QLinearLeakyRelu table);
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
    graph = out.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    by_output = {o: n for n in graph.node for o in n.output}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)}
    codes, drop, add = [], set(), []
    for cap in [n for n in graph.node if n.op_type == "Clip" and n.name.endswith("_cap")]:
        codes.append(cap.output[0])
        if variant == "clip-u8":
            continue
        q = by_output[cap.input[0]]
        scale, zero = q.input[1], q.input[2]
        top = f"{cap.name}_top_zero_point"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(int(inits[zero]) + 240, np.uint8), top))
        q.input[2] = top
        dq1 = helper.make_node("DequantizeLinear", [q.output[0], scale, top], [f"{cap.name}_top"])
        mid = f"{cap.name}_mid"
        if variant == "add0":
            zeros = f"{cap.name}_zero"  # a uint8 code behind a DQ, shaped [1]·rank (a scalar is slow)
            graph.initializer.append(onnx.numpy_helper.from_array(
                np.zeros([1] * ranks.get(q.input[0], 0), np.uint8), zeros))
            op = [helper.make_node("DequantizeLinear", [zeros, scale, zeros + "_zp"], [zeros + "_dq"]),
                  helper.make_node("Add", [dq1.output[0], zeros + "_dq"], [mid])]
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.uint8), zeros + "_zp"))
        elif variant == "leakyrelu":
            op = [helper.make_node("LeakyRelu", [dq1.output[0]], [mid], alpha=0.0 if int(inits[zero]) == 0 else 1.0)]
        else:  # merged
            op, mid = [], dq1.output[0]
        add += [dq1, *op, helper.make_node("QuantizeLinear", [mid, scale, zero], [cap.output[0]])]
        drop.add(cap.name)
    kept = [n for n in graph.node if n.name not in drop] + add
    del graph.node[:]
    graph.node.extend(kept)
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
    for variant in ("clip-u8", "add0", "leakyrelu", "merged"):
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
