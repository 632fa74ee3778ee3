"""Compile one bundled example with any compile options and print its metrics as one JSON line.

    python -m benchmarks.compile_one EXAMPLE OUT.onnx [key=value ...] [--calib-from-eval]

For exploring options that have no named configuration in ``benchmarks/run.py`` (a pipeline spec, a
learning rate): the same 64 calibration samples and eval set as the table, values parsed as Python
literals (``w_bits=4 pipeline=adaquant:lr_sx=0,bias-correction``). Prints the options, compile
seconds, the task metrics of the quantized and fp32 models and the agreement with fp32; the compile
report goes to OUT.onnx.json.

``--calib-from-eval`` calibrates on 64 samples spread evenly over the *eval* set instead: a
diagnostic of how much a result depends on the calibration set resembling the eval data, never a
result (the model is then evaluated on inputs it was calibrated on).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
import time
from typing import NoReturn

import numpy as np

from benchmarks.run import CALIB_SAMPLES, EXAMPLES, VARIANTS


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, as ``onnxptq compile``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_options(items: list[str]) -> dict:
    """``key=value`` items as compile options, each value a Python literal where it parses as one."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"option {item!r} is not key=value (e.g. w_bits=4)")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def main() -> None:
    import onnxptq
    from examples.common import run_model
    from onnxptq.errors import InputError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=[*EXAMPLES, *VARIANTS])
    parser.add_argument("out")
    parser.add_argument("options", nargs="*", help="compile options as key=value")
    parser.add_argument("--calib-from-eval", action="store_true", help="diagnostic: calibrate on the eval inputs")
    args = parser.parse_args()
    options = parse_options(args.options)
    ex = importlib.import_module(f"examples.{args.example}.example")
    fp32 = str(ex.fp32_model())
    inputs, labels = ex.eval_set()
    if args.calib_from_eval:
        n = len(next(iter(inputs.values())))
        pick = np.linspace(0, n - 1, CALIB_SAMPLES).round().astype(int)
        calib = {k: v[pick] for k, v in inputs.items()}
    else:
        calib = ex.calibration_set(CALIB_SAMPLES)
    start = time.perf_counter()
    try:
        result = onnxptq.compile(fp32, calib, args.out, **options)
    except InputError as exc:
        fail(str(exc))
    seconds = time.perf_counter() - start
    with open(args.out + ".json", "w") as f:
        json.dump(result.report, f, indent=1, default=float)
    reference, quantized = run_model(fp32, inputs), run_model(args.out, inputs)
    print(json.dumps({"example": args.example, "options": options, "calib_from_eval": args.calib_from_eval,
                      "seconds": round(seconds, 1), "metrics": ex.metrics(quantized, labels),
                      "fp32": ex.metrics(reference, labels), "agreement": ex.agreement(reference, quantized)},
                     default=float))


if __name__ == "__main__":
    main()
