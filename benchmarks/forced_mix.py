"""Compile one example with mixed precision's choice given by hand instead of solved: a diagnostic of
what one layer's width costs end to end, beside the program's own choice.

    python -m benchmarks.forced_mix EXAMPLE OUT.onnx DEFAULT [SUFFIX=LABEL ...] [key=value ...]

Every row of the program (a planned layer or table) takes candidate DEFAULT (e.g. ``w4a8``), except
those whose node name ends with a SUFFIX given, which take LABEL (labels as ``--candidates`` spells
them); ``key=value`` whose key is a compile option are passed as in ``benchmarks.compile_one`` and must give a budget (``size_ratio=0.2``, large enough that the file is
not solved again). No sensitivity is measured and no contender: the choice is written as given, with
the pipeline's corrections, and evaluated like ``compile_one`` (report in OUT.onnx.json).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from benchmarks import compile_one
from onnxptq.errors import InputError
from onnxptq.passes import mixed
from onnxptq.passes.candidates import parse_candidates
from onnxptq.state import CompileOptions


def main() -> None:
    if len(sys.argv) < 4:
        compile_one.fail("usage: python -m benchmarks.forced_mix EXAMPLE OUT.onnx DEFAULT [SUFFIX=LABEL ...] "
                         "[key=value ...]")
    example, out, default, *rest = sys.argv[1:]
    option_names = {f.name for f in dataclasses.fields(CompileOptions)}
    options = [item for item in rest if item.partition("=")[0] in option_names or "=" not in item]
    try:  # a label as ``--candidates`` spells it (``w4`` is ``w4a8``)
        default = parse_candidates(default)[0].label
        forced = {key: parse_candidates(label)[0].label
                  for key, _, label in (item.partition("=") for item in rest if item not in options)}
    except InputError as exc:
        compile_one.fail(str(exc))

    def choose(t: mixed.Tables, limit: float) -> np.ndarray:
        columns = [c.label for c in t.candidates]
        picks = [next((v for k, v in forced.items() if row.node.endswith(k)), default) for row in t.layers]
        missing = sorted(set(picks) - set(columns))
        if missing:
            compile_one.fail(f"{', '.join(missing)} not among the candidates {', '.join(columns)}")
        return np.array([columns.index(p) for p in picks])

    mixed.MixedPrecisionPass._solve = staticmethod(choose)
    mixed.MixedPrecisionPass._best_measured = staticmethod(lambda state, t, choice, limit: choice)
    mixed.MixedPrecisionPass._sensitivity = staticmethod(lambda state, t, skip: None)
    mixed.MixedPrecisionPass._joint = staticmethod(lambda state, t, choice: float("nan"))
    sys.argv = ["compile_one", example, out, *options]
    compile_one.main()


if __name__ == "__main__":
    main()
