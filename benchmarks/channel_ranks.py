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
import importlib
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from benchmarks.head_reach import fused, rerounded, uniform_w4
from benchmarks.paired import per_sample
from benchmarks.run import CALIB_SAMPLES


def main() -> None:
    from examples.common import run_model
    from onnxptq.graph import const
    from onnxptq.model_io import load_model, to_ir
    from onnxptq.passes.sensitivity import float_outputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example")
    parser.add_argument("--bits", type=int, default=3, choices=(2, 3))
    parser.add_argument("--fractions", default="0.12,0.3,0.5,0.75,1.0")
    args = parser.parse_args()
    ex = importlib.import_module(f"examples.{args.example}.example")
    fp32 = str(ex.fp32_model())
    calib = ex.calibration_set(CALIB_SAMPLES)
    inputs, _ = ex.eval_set()
    (output,), (normalized,) = float_outputs(to_ir(load_model(fp32)))
    index = [o.name for o in load_model(fp32).graph.output].index(output)
    graph = fused(fp32, calib).model.graph
    weights = {n.name: const(n.inputs[1]) for n in graph if n.op_type in ("Conv", "Gemm", "MatMul")
               and len(n.inputs) > 1 and const(n.inputs[1]) is not None}
    node = max(weights, key=lambda name: weights[name].size)
    weight = weights[node]
    axis = 0 if weight.ndim > 2 else 1  # Conv: output channels lead; Gemm/MatMul: columns

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"

        def distance(model: onnx.ModelProto, feeds: dict, ref: np.ndarray) -> tuple[float, float | None]:
            onnx.save(model, path)
            d, agree = per_sample(ref, run_model(path, feeds)[index], normalized)
            return float(d.mean()), None if agree is None else float(agree.mean())

        calib_ref, eval_ref = (run_model(fp32, feeds)[index] for feeds in (calib, inputs))
        model = uniform_w4(fp32, calib, Path(tmp) / "w4.onnx")
        base = distance(model, calib, calib_ref)[0]
        channels = weight.shape[axis]
        cost = np.array([distance(rerounded(model, node, weight, np.array([c]), args.bits), calib, calib_ref)[0]
                         - base for c in range(channels)])
        print(json.dumps({"example": args.example, "layer": node, "channels": channels, "bits": args.bits,
                          "calibration_distance": base, "cost_sum": float(cost.sum()),
                          "cost_quantiles": np.percentile(cost, [0, 25, 50, 75, 100]).round(7).tolist(),
                          "eval": distance(model, inputs, eval_ref)}))
        orders = {"cheapest": np.argsort(cost, kind="stable"), "random": np.random.default_rng(0).permutation(channels)}
        for fraction in (float(f) for f in args.fractions.split(",")):
            for order, ranked in orders.items():
                m = rerounded(model, node, weight, np.sort(ranked[:round(fraction * channels)]), args.bits)
                print(json.dumps({"fraction": fraction, "order": order,
                                  "calibration_distance": distance(m, calib, calib_ref)[0],
                                  "eval_distance_agreement": distance(m, inputs, eval_ref)}), flush=True)


if __name__ == "__main__":
    main()
