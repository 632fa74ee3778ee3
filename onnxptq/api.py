"""The Python API: ``compile`` a model, ``evaluate`` a quantized model against its fp32 original."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxptq import pipelines, runtime
from onnxptq.data import ImageOptions, load_calibration
from onnxptq.effects import PassEffects
from onnxptq.errors import BudgetError, InputError
from onnxptq.latency import interleaved_latency
from onnxptq.metrics import compare_outputs
from onnxptq.model_io import check_output_path, load_model, save_model, to_ir
from onnxptq.passes.bitsplit import BitSplitPass
from onnxptq.passes.calibration import CalibrationPass
from onnxptq.passes.candidates import budget_of
from onnxptq.passes.emission import EmissionPass
from onnxptq.passes.fusion import FusionPass
from onnxptq.passes.groups import LayerGroupPass
from onnxptq.passes.heads import HeadSplitPass
from onnxptq.passes.mixed import MixedPrecisionPass
from onnxptq.passes.select import SelectPass
from onnxptq.passes.tables import TablePass
from onnxptq.passes.verification import VerificationPass
from onnxptq.passes.weights import WeightGridPass
from onnxptq.state import BLOCK_SIZES, CompileOptions, CompileState, Progress, run_passes

PIPELINE = (FusionPass, LayerGroupPass, HeadSplitPass, SelectPass, CalibrationPass, WeightGridPass, BitSplitPass, TablePass,
            MixedPrecisionPass, EmissionPass, VerificationPass)


@dataclass
class CompileResult:
    """The quantized model and the compile report (the same data ``--json`` writes)."""

    model: onnx.ModelProto
    report: dict[str, Any]

    def save(self, path: str | os.PathLike) -> None:
        save_model(self.model, check_output_path(path, []))


def _as_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, None
    return load_model(model), str(model)


def _options(options: dict[str, Any]) -> CompileOptions:
    known = {f.name for f in fields(CompileOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown compile option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    opts = CompileOptions(**options)
    if opts.block_size not in BLOCK_SIZES:
        raise InputError(f"--block-size {opts.block_size}: onnxruntime's MatMulNBits takes blocks of "
                         f"{', '.join(map(str, BLOCK_SIZES[:-1]))} or {BLOCK_SIZES[-1]} weights; give one of those")
    return opts


def default_holdout(n: int) -> int:
    """Samples held back from calibration to verify on: a fifth, at most 64, none below 10 samples."""
    return 0 if n < 10 else min(64, n // 5)


def model_summary(model: onnx.ModelProto, path: str | None) -> dict[str, Any]:
    ops = collections.Counter(n.op_type for n in model.graph.node)
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    return {"path": path, "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "nodes": len(model.graph.node), "parameters": params, "ops": dict(sorted(ops.items())),
            "bytes": model.ByteSize()}


def compile(model: str | os.PathLike | onnx.ModelProto, calib: Any, output: str | os.PathLike | None = None, *,
            image_options: ImageOptions | None = None, progress: Progress | None = None,
            **options: Any) -> CompileResult:
    """Quantize ``model`` with calibration data ``calib`` (see ``onnxptq.data``) and return the QDQ model.

    ``options`` are the fields of ``CompileOptions``; ``pipeline`` adds correction passes between the
    weight grids and emission (``onnxptq.pipelines``). With ``output`` the model is written atomically
    there; the output path is checked before any work starts. The input model is never modified.
    """
    opts = _options(options)
    passes = pipelines.build(opts.pipeline, PIPELINE)
    budget_of(opts)  # mixed-precision options are checked before any work
    source, path = _as_model(model)
    if output is not None:
        check_output_path(output, [p for p in (path, calib) if isinstance(p, (str, os.PathLike))])
    data = load_calibration(calib, source, image_options)
    holdout = default_holdout(len(data)) if opts.holdout is None else opts.holdout
    calib_set, held = data.split(holdout)
    state = CompileState(source=source, model=to_ir(source), options=opts, calib=calib_set, holdout=held,
                         progress=progress or Progress(),
                         corrections=[p for p in passes if p.name in pipelines.CORRECTIONS])
    state.report.model = model_summary(source, path)
    state.report.options = opts.to_dict()
    state.report.warnings.extend(pipelines.order_warnings(passes))
    run_passes(state, passes, PassEffects() if opts.pass_effects else None)
    state.report.model["quantized_bytes"] = state.output.ByteSize()
    state.report.model["size_ratio"] = round(state.output.ByteSize() / max(source.ByteSize(), 1), 4)
    result = CompileResult(state.output, state.report.to_dict())
    if output is not None:
        save_model(state.output, output)
    return result


def planned_state(model: str | os.PathLike | onnx.ModelProto, calib: Any, *,
                  image_options: ImageOptions | None = None, progress: Progress | None = None,
                  **options: Any) -> CompileState:
    """The compile state after the planning passes (fusion through the weight solver): the fused fp32
    graph and a plan with calibrated grids, before corrections and emission; all samples calibrate."""
    opts = _options(options)
    source, _ = _as_model(model)
    state = CompileState(source=source, model=to_ir(source), options=opts,
                         calib=load_calibration(calib, source, image_options), holdout=None,
                         progress=progress or Progress())
    run_passes(state, [p() for p in PIPELINE[:PIPELINE.index(EmissionPass)]])
    return state


def check_budgets(report: dict[str, Any], min_coverage: float | None = None, min_sqnr: float | None = None,
                  min_top1: float | None = None) -> None:
    """Raise ``BudgetError`` naming every quality budget the compiled model missed."""
    ver = report["verification"]
    missed = []
    if min_coverage is not None and ver["coverage"] is None:
        missed.append(f"fusion coverage is not measured for target {report['model'].get('target')}")
    elif min_coverage is not None and ver["coverage"] < min_coverage:
        missed.append(f"fusion coverage {ver['coverage']:.3f} < {min_coverage}")
    for name, m in ver["outputs"].items():
        if min_sqnr is not None and "sqnr_db" in m and m["sqnr_db"] < min_sqnr:
            missed.append(f"output {name!r} SQNR {m['sqnr_db']:.2f} dB < {min_sqnr}")
        if min_top1 is not None and "top1_agreement" in m and m["top1_agreement"] < min_top1:
            missed.append(f"output {name!r} top-1 agreement {m['top1_agreement']:.3f} < {min_top1}")
    if missed:
        raise BudgetError("quality budget missed: " + "; ".join(missed))


def evaluate(fp32: str | os.PathLike, quantized: str | os.PathLike, data: Any, *, threads: int = 1,
             runs: int = 20, batch_size: int = 8, image_options: ImageOptions | None = None) -> dict[str, Any]:
    """Compare a quantized model with its fp32 original on ``data``: output agreement, file size
    ratio, and latency ratio (interleaved runs in this process at ``threads`` threads)."""
    ref_model, q_model = load_model(fp32), load_model(quantized)
    samples = load_calibration(data, ref_model, image_options)
    feeds = list(samples.batches(batch_size))
    ref_sess = runtime.session(ref_model, threads=threads)
    q_sess = runtime.session(q_model, threads=threads)
    try:
        test = runtime.run_all(q_sess, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types for mismatched inputs
        raise InputError(f"the quantized model does not run on this data: {str(exc).splitlines()[0]}") from exc
    ref = runtime.run_all(ref_sess, feeds)
    names = [o.name for o in ref_model.graph.output]
    lat = interleaved_latency({"fp32": ref_sess, "quantized": q_sess}, feeds[0], runs=runs)
    return {
        "samples": len(samples),
        "outputs": compare_outputs(names, ref, test),
        "size_ratio": round(Path(quantized).stat().st_size / Path(fp32).stat().st_size, 4),
        "latency_ms": {k: round(v, 3) for k, v in lat.items()},
        "latency_ratio": round(lat["quantized"] / lat["fp32"], 4),
        "threads": threads,
    }
