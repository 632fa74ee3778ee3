"""Benchmark table: every example × the table's configurations (``TABLE``; any other by name),
beside onnxruntime's quantize_static.

    python -m benchmarks.run [--examples efficientnet_lite0,ppocr_rec,...] [--configs ...] [--out benchmarks/results]

For each example: build the fp32 model, take 64 unlabeled calibration samples (disjoint from the eval
set), compile every configuration from the same samples, then evaluate all models on the eval set.
Reported per row: the example's task metric and its drop vs fp32, agreement with fp32, file size ratio,
latency ratio vs fp32 (interleaved runs in one process, 1 thread, one sample per run), compile time,
the weight solvers' median seconds per layer, and the compile's peak RSS (each compile runs in a fresh
process). Writes ``results.md``, ``results.json`` and every onnxptq compile's JSON report in ``reports/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = ("efficientnet_lite0", "ppocr_rec", "minilm", "magika")
# Not in the default run: a variant of an example above, for ablations (--examples to run it).
VARIANTS = ("efficientnet_lite0_bn",)
CALIB_SAMPLES = 64


def _compile_onnxptq(fp32: str, calib: dict, out: str, options: dict) -> dict:
    import onnxptq

    return {"report": onnxptq.compile(fp32, calib, out, **options).report}


def solver_times(report: dict) -> dict[str, dict]:
    """Per weight solver pass of a compile report (a pass with per-layer rows: bitsplit, adaquant), the
    layers it solved and the median and total of their solve seconds."""
    times = {}
    for entry in report.get("passes", []):
        seconds = [row["seconds"] for row in entry.get("layers", []) if "seconds" in row]
        if seconds:
            times[entry["name"]] = {"layers": len(seconds), "median_s": float(statistics.median(seconds)),
                                    "total_s": float(sum(seconds))}
    return times


def _compile_ort(fp32: str, calib: dict, out: str, method: str) -> None:
    """onnxruntime's quantize_static (QDQ, per-channel, u8 activations, s8 weights) with ``method``
    calibration; ``<method>+pre`` first runs its recommended ``quant_pre_process`` (shape inference and
    onnxruntime's graph optimizations, which turn Constant-node weights into initializers)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # quantize_static and quant_pre_process write temporary models (sym_shape_infer_temp.onnx, <uuid>.data)
    # into the working directory and may leave them there: work in the output's folder (this runs in
    # its own process, so the directory change does not leak).
    fp32, out = os.path.abspath(fp32), os.path.abspath(out)
    os.chdir(os.path.dirname(out))
    method, _, pre = method.partition("+")
    if pre:
        quant_pre_process(fp32, out + ".pre.onnx")
        fp32 = out + ".pre.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calib.values())))
            self.feeds = iter({k: v[i:i + 1] for k, v in calib.items()} for i in range(n))

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax,
                                      "entropy": CalibrationMethod.Entropy}[method])


def _compile_ort_nbits(fp32: str, calib: dict, out: str, block: int) -> None:
    """onnxruntime's weight-only 4-bit quantizer (``MatMulNBitsQuantizer``, round-to-nearest, symmetric,
    blocks of ``block`` along K, int8 compute): its 4-bit option for MatMul weights. It does not
    quantize Conv or Gemm nor any activation, and takes no calibration data."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(fp32), bits=4, block_size=block, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    onnx.save(quantizer.model.model, out)


CONFIGS = {
    "onnxptq W8A8": (_compile_onnxptq, {}),
    "onnxptq W8A8 avx2-safe": (_compile_onnxptq, {"target": "ort-cpu-avx2"}),
    "onnxptq W4A8": (_compile_onnxptq, {"w_bits": 4}),
    "onnxptq W4A8 bitsplit": (_compile_onnxptq, {"w_bits": 4, "weight_solver": "bitsplit"}),
    "onnxptq W4A4": (_compile_onnxptq, {"w_bits": 4, "a_bits": 4}),
    "onnxptq W4A8 size": (_compile_onnxptq, {"w_bits": 4, "target": "ort-cpu-size"}),
    # uniform 4-bit at its smallest (first and last layers 4-bit too): the size mixed budgets compare with
    "onnxptq W4A8 size all layers": (_compile_onnxptq, {"w_bits": 4, "target": "ort-cpu-size", "first_last_8bit": False}),
    "onnxptq W4A8 size all layers advanced": (_compile_onnxptq, {"w_bits": 4, "target": "ort-cpu-size",
                                                                 "first_last_8bit": False, "pipeline": "advanced"}),
    "onnxptq W4A8 size all layers bitsplit": (_compile_onnxptq, {"w_bits": 4, "target": "ort-cpu-size",
                                                                 "first_last_8bit": False,
                                                                 "weight_solver": "bitsplit"}),
    # uniform 3-bit packed eight codes per three bytes (onnxptq/int3.py)
    **{f"onnxptq W3A8 size all layers{label}": (_compile_onnxptq, {"w_bits": 3, "target": "ort-cpu-size",
                                                                   "first_last_8bit": False, **extra})
       for label, extra in (("", {}), (" bitsplit", {"weight_solver": "bitsplit"}))},
    "onnxptq W4A4 size": (_compile_onnxptq, {"w_bits": 4, "a_bits": 4, "target": "ort-cpu-size"}),
    "onnxptq W3A8": (_compile_onnxptq, {"w_bits": 3}),
    "onnxptq W3A8 bitsplit": (_compile_onnxptq, {"w_bits": 3, "weight_solver": "bitsplit"}),
    "onnxptq W2A8": (_compile_onnxptq, {"w_bits": 2}),
    "onnxptq W2A8 bitsplit": (_compile_onnxptq, {"w_bits": 2, "weight_solver": "bitsplit"}),
    # rows before session 8 named "bitsplit" ran what is now bitsplit-sequential
    **{f"onnxptq W{b}A8 bitsplit sequential": (_compile_onnxptq, {"w_bits": b, "weight_solver": "bitsplit-sequential"})
       for b in (2, 3, 4)},
    "onnxptq W8A8 no corrections": (_compile_onnxptq, {"pipeline": "calibration"}),
    "onnxptq W8A8 +bias": (_compile_onnxptq, {"pipeline": "bias-correction"}),
    "onnxptq W8A8 +bn": (_compile_onnxptq, {"pipeline": "bn-reestimate:layers=hidden"}),
    "onnxptq W8A8 +bn+bias": (_compile_onnxptq, {"pipeline": "light"}),
    "onnxptq W8A8 +bn(target=bn)": (_compile_onnxptq, {"pipeline": "bn-reestimate:layers=bn:target=bn"}),
    "onnxptq W8A8 +bn(target=bn)+bias": (_compile_onnxptq,
                                         {"pipeline": "bn-reestimate:layers=bn:target=bn,bias-correction"}),
    "onnxptq W4A8 no corrections": (_compile_onnxptq, {"w_bits": 4, "pipeline": "calibration"}),
    "onnxptq W4A8 +bias": (_compile_onnxptq, {"w_bits": 4, "pipeline": "bias-correction"}),
    "onnxptq W4A8 +bn": (_compile_onnxptq, {"w_bits": 4, "pipeline": "bn-reestimate:layers=hidden"}),
    "onnxptq W4A8 +bn+bias": (_compile_onnxptq, {"w_bits": 4, "pipeline": "light"}),
    "onnxptq W4A8 +bn(target=bn)": (_compile_onnxptq, {"w_bits": 4, "pipeline": "bn-reestimate:layers=bn:target=bn"}),
    # bias tuning in place of bias correction (needs `make .venv-training/.installed`), light and advanced;
    # "advanced+tuning" is what "advanced" became at 56628ee (before, it ended with bias correction)
    "onnxptq W4A8 +bn+tuning": (_compile_onnxptq, {"w_bits": 4, "pipeline": "bn-reestimate:layers=hidden,bias-tuning"}),
    "onnxptq W4A8 advanced+tuning": (_compile_onnxptq, {"w_bits": 4, "pipeline": "adaquant,bn-reestimate:layers=hidden,"
                                                                                 "bias-tuning"}),
    "onnxptq W8A8 advanced": (_compile_onnxptq, {"pipeline": "advanced"}),
    "onnxptq W4A8 advanced": (_compile_onnxptq, {"w_bits": 4, "pipeline": "advanced"}),
    "onnxptq W3A8 advanced": (_compile_onnxptq, {"w_bits": 3, "pipeline": "advanced"}),
    "onnxptq W2A8 advanced": (_compile_onnxptq, {"w_bits": 2, "pipeline": "advanced"}),
    "onnxptq W4A4 advanced": (_compile_onnxptq, {"w_bits": 4, "a_bits": 4, "pipeline": "advanced"}),
    # `--pipeline advanced` with AdaQuant in parallel mode (rows before session 8: bias correction last)
    **{f"onnxptq W4A{a} advanced parallel": (_compile_onnxptq, {"w_bits": 4, "a_bits": a, "pipeline":
                                                                "adaquant:mode=parallel,bn-reestimate:layers=hidden,"
                                                                "bias-tuning"}) for a in (8, 4)},
    "onnxptq W4A8 adaquant": (_compile_onnxptq, {"w_bits": 4, "pipeline": "adaquant"}),
    "onnxptq W4A8 adaquant parallel": (_compile_onnxptq, {"w_bits": 4, "pipeline": "adaquant:mode=parallel"}),
    # AdaQuant's onnxruntime-training engine (needs `make .venv-training/.installed`)
    "onnxptq W4A8 advanced ort-training": (_compile_onnxptq, {"w_bits": 4, "pipeline": "adaquant:engine=ort-training,"
                                                              "bn-reestimate:layers=hidden,bias-correction"}),
    **{f"onnxptq W4A8 advanced parallel {n} it": (
        _compile_onnxptq, {"w_bits": 4, "pipeline": f"adaquant:mode=parallel:iterations={n},"
                                                    "bn-reestimate:layers=hidden,bias-correction"})
       for n in (30, 300, 1000)},
    # Size budgets on the packed target (sub-8-bit weights stored as int4); uniform W4A8 stores
    # 0.186x (EfficientNet-Lite0) and 0.170x (magika) there.
    **{f"onnxptq mixed size {r}": (_compile_onnxptq, {"size_ratio": r, "target": "ort-cpu-size"})
       for r in (0.13, 0.16, 0.17, 0.19)},
    # The corrections' ablation at a 0.13x size budget (issue 6); "onnxptq mixed size 0.13" is its light row.
    **{f"onnxptq mixed size 0.13 {label}": (_compile_onnxptq, {"size_ratio": 0.13, "target": "ort-cpu-size",
                                                                "pipeline": pipeline})
       for label, pipeline in (("no corrections", "calibration"), ("+bn", "bn-reestimate:layers=hidden"),
                               ("+bias", "bias-correction"), ("advanced", "advanced"))},
    "onnxptq mixed size 0.16 advanced": (_compile_onnxptq, {"size_ratio": 0.16, "target": "ort-cpu-size",
                                                            "pipeline": "advanced"}),
    **{f"onnxptq mixed size {r} bitsplit": (_compile_onnxptq, {"size_ratio": r, "target": "ort-cpu-size",
                                                               "weight_solver": "bitsplit"}) for r in (0.13, 0.16)},
    "onnxptq mixed bops 0.03125": (_compile_onnxptq, {"bops_ratio": 1 / 32}),  # uniform W4A8's BOPs (4·8/32²)
    **{f"onnxptq W4A8 advanced {n} it": (
        _compile_onnxptq, {"w_bits": 4, "pipeline": f"adaquant:iterations={n},"
                                                    "bn-reestimate:layers=hidden,bias-correction"})
       for n in (30, 300, 1000)},
    # Plain opset-21 QDQ for other runtimes (full-range 8-bit weights, int4 weights per channel);
    # timed here on onnxruntime's CPU provider like every row.
    "onnxptq W8A8 generic-qdq": (_compile_onnxptq, {"target": "generic-qdq"}),
    "onnxptq W4A8 generic-qdq": (_compile_onnxptq, {"w_bits": 4, "target": "generic-qdq"}),
    "ORT quantize_static MinMax": (_compile_ort, "minmax"),
    "ORT quantize_static Entropy": (_compile_ort, "entropy"),
    "ORT MatMulNBits W4 weight-only": (_compile_ort_nbits, 32),
    "ORT quantize_static MinMax preprocessed": (_compile_ort, "minmax+pre"),
}


# The table the README shows (``make bench``); every other config runs by name with --configs.
TABLE = ("onnxptq W8A8", "onnxptq W8A8 no corrections", "onnxptq W4A8", "onnxptq W4A8 advanced", "onnxptq W4A4",
         "onnxptq W4A4 advanced", "onnxptq W4A8 size", "onnxptq mixed size 0.16", "ORT quantize_static MinMax",
         "ORT quantize_static Entropy", "ORT quantize_static MinMax preprocessed")


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over fork and
    exec, so a spawned child reported at least its parent's size (every magika and MiniLM compile showed
    3489 MB after the PP-OCR rows had grown the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def _child(fn, args, queue) -> None:
    start = time.perf_counter()
    try:
        extra = fn(*args) or {}
        queue.put({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), **extra})
    except Exception as exc:  # reported in the table, the run goes on
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})


def compile_in_child(fn, args) -> dict:
    """Run one compile in a fresh process, so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_example(name: str, configs: list[str], workdir: Path, runs: int, reports: Path) -> list[dict]:
    """The rows of example ``name``; each onnxptq compile's JSON report is written into ``reports``."""
    from onnxptq import runtime
    from onnxptq.latency import interleaved_latency

    ex = importlib.import_module(f"examples.{name}.example")
    fp32 = str(ex.fp32_model())
    calib = ex.calibration_set(CALIB_SAMPLES)
    inputs, labels = ex.eval_set()
    paths = {"fp32": fp32}
    rows = {"fp32": {"example": name, "config": "fp32"}}
    for config in configs:
        fn, arg = CONFIGS[config]
        out = str(workdir / f"{name}-{config.replace(' ', '_')}.onnx")
        print(f"[{name}] compiling {config} …", file=sys.stderr, flush=True)
        info = compile_in_child(fn, (fp32, calib, out, arg))
        if "report" in info:  # the full compile report goes to its own file, the row keeps the solver times
            report = info.pop("report")
            info["solvers"] = solver_times(report)
            (reports / f"{name}-{config.replace(' ', '_')}.json").write_text(json.dumps(report, indent=1) + "\n")
        rows[config] = {"example": name, "config": config, **info}
        if "error" not in info:
            paths[config] = out
    sessions = {}
    for key, path in list(paths.items()):
        try:
            sessions[key] = runtime.session(path, threads=1)
        except Exception as exc:  # onnxruntime rejects the model: reported in the table, the run goes on
            rows[key]["error"] = f"onnxruntime cannot load it: {str(exc).splitlines()[0][-160:]}"
            del paths[key]
    from examples.common import run_model

    outputs = {k: run_model(p, inputs) for k, p in paths.items()}
    one = {k: v[:1] for k, v in inputs.items()}
    latency = interleaved_latency(sessions, one, runs=runs)
    fp_size = Path(fp32).stat().st_size
    fp_metrics = ex.metrics(outputs["fp32"], labels)
    for key, path in paths.items():
        m = ex.metrics(outputs[key], labels)
        row = rows[key]
        row["metrics"] = m
        row["primary"] = m[ex.PRIMARY]
        sign = 1 if ex.HIGHER_IS_BETTER else -1
        row["drop"] = sign * (fp_metrics[ex.PRIMARY] - m[ex.PRIMARY])
        row["agreement"] = ex.agreement(outputs["fp32"], outputs[key])
        row["size_ratio"] = Path(path).stat().st_size / fp_size
        row["latency_ms"] = latency[key]
        row["latency_ratio"] = latency[key] / latency["fp32"]
    return [dict(rows[k], primary_name=ex.PRIMARY) for k in ["fp32", *configs]]


def markdown(rows: list[dict]) -> str:
    head = ("| example | config | metric | value | drop vs fp32 | agreement with fp32 | size × | latency × | "
            "compile s | solver s/layer | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['example']} | {r['config']} | failed: {r['error']} | | | | | | | | |")
            continue
        solvers = ", ".join(f"{k} {v['median_s']:.2f} (×{v['layers']}, Σ {v['total_s']:.0f} s)"
                            for k, v in r.get("solvers", {}).items())
        agree = ", ".join(f"{k} {v:.4f}" for k, v in r.get("agreement", {}).items()) if r["config"] != "fp32" else ""
        lines.append(f"| {r['example']} | {r['config']} | {r['primary_name']} | {r['primary']:.4f} | "
                     f"{r['drop']:+.4f} | {agree} | {r['size_ratio']:.3f} | {r['latency_ratio']:.3f} | "
                     f"{r.get('seconds', 0):.1f} | {solvers} | {r.get('peak_rss_mb', 0):.0f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", default=",".join(EXAMPLES))
    parser.add_argument("--configs", default=",".join(TABLE), help="comma-separated; known: " + ", ".join(CONFIGS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    examples = [e for e in args.examples.split(",") if e]
    if set(examples) - {*EXAMPLES, *VARIANTS}:
        parser.error(f"unknown examples {sorted(set(examples) - {*EXAMPLES, *VARIANTS})}; "
                     f"known: {[*EXAMPLES, *VARIANTS]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    meta = {"onnxruntime": ort.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "calibration_samples": CALIB_SAMPLES, "threads": 1}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in examples:
            rows += run_example(name, configs, Path(tmp), args.runs, reports)
            # written after every example, so a long run's finished rows survive an interruption
            (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")
            (out / "results.md").write_text(f"onnxruntime {meta['onnxruntime']}, {CALIB_SAMPLES} calibration samples, "
                                            f"latency at 1 thread, one sample per run.\n\n" + markdown(rows))
            print(markdown(rows), file=sys.stderr)
    print(markdown(rows))


if __name__ == "__main__":
    main()
