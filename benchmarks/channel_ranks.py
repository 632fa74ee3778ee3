"""Can the calibration set rank one layer's output channels for fewer bits?

    python -m benchmarks.channel_ranks EXAMPLE [--bits 3] [--fractions 0.12,0.3,0.5,0.75,1.0]

Compiles the example at uniform W4A8 with int8 codes (as ``benchmarks.head_reach``), takes its layer with
the most weights, and prices each output channel c alone: ΔL_c, the rise of the mean distance to fp32 on
the table's calibration samples when only channel c is re-rounded to ``--bits`` (per-channel MSE
scale). Then re-rounds a fraction of the channels — those of least ΔL_c first, or at random (seed 0) —
and measures each model on the calibration samples and on the eval set (top-1 agreement and mean
distance to fp32). If the calibration set could rank the channels, the channels it calls cheap would
cost less on the eval set than random ones. One JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.head_reach import Scoring, fused, rerounded, uniform_w4
from benchmarks.run import EXAMPLES


def main() -> None:
    from onnxptq.graph import const

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=EXAMPLES)
    parser.add_argument("--bits", type=int, default=3, choices=(2, 3))
    parser.add_argument("--fractions", default="0.12,0.3,0.5,0.75,1.0")
    args = parser.parse_args()
    scoring = Scoring(args.example)
    calib, inputs = scoring.calib, scoring.inputs
    weights = {n.name: w for n in fused(scoring.fp32, calib).model.graph
               if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1
               and (w := const(n.inputs[1])) is not None}
    node = max(weights, key=lambda name: weights[name].size)
    weight = weights[node]
    channels = weight.shape[0 if weight.ndim > 2 else 1]  # Conv: output channels lead; Gemm/MatMul: columns

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        calib_ref, eval_ref = scoring.reference(calib), scoring.reference(inputs)
        model = uniform_w4(scoring.fp32, calib, Path(tmp) / "w4.onnx")
        base = scoring.distance(model, path, calib, calib_ref)[0]
        cost = np.array([scoring.distance(rerounded(model, node, weight, np.array([c]), args.bits), path, calib,
                                          calib_ref)[0] - base for c in range(channels)])
        print(json.dumps({"example": args.example, "layer": node, "channels": channels, "bits": args.bits,
                          "calibration_distance": base, "cost_sum": float(cost.sum()),
                          "cost_quantiles": np.percentile(cost, [0, 25, 50, 75, 100]).round(7).tolist(),
                          "eval": scoring.distance(model, path, inputs, eval_ref)}))
        orders = {"cheapest": np.argsort(cost, kind="stable"), "random": np.random.default_rng(0).permutation(channels)}
        for fraction in (float(f) for f in args.fractions.split(",")):
            for order, ranked in orders.items():
                m = rerounded(model, node, weight, np.sort(ranked[:round(fraction * channels)]), args.bits)
                print(json.dumps({"fraction": fraction, "order": order,
                                  "calibration_distance": scoring.distance(m, path, calib, calib_ref)[0],
                                  "eval_distance_agreement": scoring.distance(m, path, inputs, eval_ref)}),
                      flush=True)


if __name__ == "__main__":
    main()
