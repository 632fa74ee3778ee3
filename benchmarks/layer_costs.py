"""Per-layer cost facts of a bundled example: bytes and measured latency of every encoding.

    python -m benchmarks.layer_costs --example efficientnet_lite0 [--layers 6] [--runs 20]

Plans the example's fp32 model from 16 calibration samples (``onnxptq.planned_state``), then for
``--layers`` layers spread over the model prints ``onnxptq.costs.cost_table``: bytes in the file and
median latency (one thread, interleaved) of the layer alone in each encoding, and the ratios to int8.
"""

from __future__ import annotations

import argparse
import importlib

import onnxptq
from onnxptq.costs import cost_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", default="efficientnet_lite0")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    ex = importlib.import_module(f"examples.{args.example}.example")
    state = onnxptq.planned_state(ex.fp32_model(), ex.calibration_set(16), w_bits=4, pipeline="calibration")
    names = list(state.plan.layers)
    n = min(args.layers, len(names))
    rows = cost_table(state, [names[round(k * (len(names) - 1) / max(n - 1, 1))] for k in range(n)], runs=args.runs)
    print("| layer | op | params | encoding | bytes | bytes / int8 | latency ms | latency / int8 |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in rows:
        for enc, ms in row["latency_ms"].items():
            print(f"| {row['node']} | {row['op']} | {row['parameters']} | {enc} | {row['bytes'][enc]} | "
                  f"{row['bytes'][enc] / row['bytes']['int8']:.3f} | {ms:.4f} | "
                  f"{ms / row['latency_ms']['int8']:.2f} |")


if __name__ == "__main__":
    main()
