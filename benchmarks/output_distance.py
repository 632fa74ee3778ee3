"""How far quantized models' outputs are from the fp32 model's, in the units mixed precision predicts.

    python -m benchmarks.output_distance EXAMPLE MODEL.onnx [MODEL.onnx ...] [--samples 16]

For each model: the distance of its float outputs to the fp32 model's (``passes/sensitivity.py``'s
``output_distance``: mean KL for class scores, else 1 − cosine) on the first ``--samples`` samples of
the example's 64-sample calibration set — the subset the integer program's ΔL is measured on, so a
compile report's ``predicted_loss`` and ``measured_loss`` compare with it directly — and on the eval set.
One JSON line per model.
"""

from __future__ import annotations

import argparse
import importlib
import json

from benchmarks.run import CALIB_SAMPLES, EXAMPLES, VARIANTS


def main() -> None:
    from benchmarks.compile_one import fail
    from examples.common import run_model
    from onnxptq.errors import InputError
    from onnxptq.model_io import load_model, to_ir
    from onnxptq.passes.sensitivity import SAMPLES, float_outputs, output_distance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=[*EXAMPLES, *VARIANTS])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="calibration samples (the first ones)")
    args = parser.parse_args()
    ex = importlib.import_module(f"examples.{args.example}.example")
    fp32 = str(ex.fp32_model())
    calib = {k: v[:args.samples] for k, v in ex.calibration_set(CALIB_SAMPLES).items()}
    inputs, _ = ex.eval_set()
    names, normalized = float_outputs(to_ir(load_model(fp32)))
    try:  # every model is read before any runs: a bad path is a one-line error at once
        graph_outputs = {m: [o.name for o in load_model(m).graph.output] for m in [fp32, *args.models]}
    except InputError as exc:
        fail(str(exc))

    def outputs(model: str, data: dict) -> list:
        """``model``'s float outputs (those of the fp32 model, by name) on ``data``."""
        return [dict(zip(graph_outputs[model], run_model(model, data)))[n] for n in names]

    sets = {"calib": calib, "eval": inputs}
    refs = {key: outputs(fp32, data) for key, data in sets.items()}
    for model in args.models:
        print(json.dumps({"model": model, **{f"{key}_distance": output_distance(refs[key], outputs(model, data),
                                                                                normalized)
                                            for key, data in sets.items()}}))


if __name__ == "__main__":
    main()
