"""The compile state every pass reads and writes, the compile options, and the report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir

from onnxptq.data import CalibrationSet
from onnxptq.plan import QuantPlan

T = TypeVar("T")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what onnxruntime's MatMulNBits takes: powers of two from 16 to 256


@dataclass(frozen=True)
class CompileOptions:
    """Everything a compile depends on besides the model and the data (echoed into the report)."""

    w_bits: int = 8
    a_bits: int = 8
    calib_method: str = "mse"
    percentile: float = 99.999
    weight_method: str = "mse"
    weight_solver: str = "rtn"  # rtn (round-to-nearest), bitsplit or bitsplit-sequential (passes/bitsplit.py)
    exclude: str | None = None
    target: str = "ort-cpu"
    seed: int = 0
    holdout: int | None = None
    batch_size: int = 8
    threads: int = 0
    block_size: int = 32  # weights per scale of a 4-bit MatMul/Gemm under int4 storage, one of BLOCK_SIZES
    pipeline: str = "light"  # a name or a spec of correction passes (onnxptq/pipelines.py)
    first_last_8bit: bool = True  # below 8 bits, keep the first and last layers (and their inputs) at 8
    # mixed precision (passes/mixed.py): at most one budget; candidates per layer
    size_ratio: float | None = None
    bops_ratio: float | None = None
    max_drop: float | None = None
    latency_ratio: float | None = None
    latency_table: str | None = None  # JSON file of per-layer latencies (onnxptq/latency_table.py)
    candidates: str = "w8a8,w4a8,w3a8,w2a8,float"
    sweep: str | None = None  # a folder: also solve a range of budgets, write pareto.md and pareto.png there
    short_names: bool = True  # goal size: values under short names (onnxptq/short_names.py)
    pass_effects: bool = True  # agreement with fp32 after every pass that changed the model (onnxptq/effects.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """Progress reporting; silent by default, given a console a rich progress bar on a terminal and one
    line per finished step elsewhere (a CI log: a live bar redrawn off a terminal leaves blank lines)."""

    def __init__(self, console: Any = None):
        self.console = console

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if self.console is None:
            yield from items
            return
        if not self.console.is_terminal:
            start, done = time.perf_counter(), 0
            for item in items:
                yield item
                done += 1
            of = f"/{total}" if total is not None else ""
            self.console.print(f"{description}: {done}{of} in {time.perf_counter() - start:.1f} s", highlight=False)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        with RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)


@dataclass
class Report:
    """What a compile did and measured; ``to_dict`` is the JSON report."""

    model: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    mixed: dict[str, Any] = field(default_factory=dict)
    effects: list[dict[str, Any]] = field(default_factory=list)

    def note(self, pass_name: str, text: str) -> None:
        for entry in self.passes:
            if entry["name"] == pass_name:
                entry.setdefault("notes", []).append(text)
                return
        self.passes.append({"name": pass_name, "notes": [text]})

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "options": self.options, "passes": self.passes,
                "layers": self.layers, "verification": self.verification, "warnings": self.warnings,
                **({"mixed": self.mixed} if self.mixed else {}), **({"effects": self.effects} if self.effects else {})}


@dataclass
class CompileState:
    """The model being compiled and everything the passes know about it.

    ``source`` is the user's model and is never modified; ``model`` is the working fp32 graph (onnx-ir),
    ``plan`` the quantization plan, ``output`` the emitted QDQ model once emission has run.
    """

    source: onnx.ModelProto
    model: ir.Model
    options: CompileOptions
    calib: CalibrationSet
    holdout: CalibrationSet | None
    plan: QuantPlan = field(default_factory=QuantPlan)
    report: Report = field(default_factory=Report)
    progress: Progress = field(default_factory=Progress)
    output: onnx.ModelProto | None = None
    fused: onnx.ModelProto | None = None
    reference: list[np.ndarray] | None = None  # the fp32 model's outputs on the verification samples
    calib_reference: Any = None  # the fp32 model's outputs on the calibration set (passes/kept.py)
    calib_distances: dict[bytes, float] = field(default_factory=dict)  # emitted model's digest → its distance
    corrections: list[Any] = field(default_factory=list)  # the pipeline's correction passes, in order
    # calibrated tensor → (running min/max, histogram or None), kept by the calibration pass
    range_statistics: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def run_passes(state: CompileState, passes: Iterable[Any],
               after: Callable[[CompileState, str], None] | None = None) -> None:
    """Run ``passes`` in order on ``state``, timing each into the report; ``after(state, name)`` is
    called after each pass, outside its timing."""
    for p in passes:
        start = time.perf_counter()
        p.run(state)
        seconds = round(time.perf_counter() - start, 3)
        for entry in state.report.passes:
            if entry["name"] == p.name:
                entry["seconds"] = seconds
                break
        else:
            state.report.passes.append({"name": p.name, "seconds": seconds})
        if after is not None:
            after(state, p.name)
