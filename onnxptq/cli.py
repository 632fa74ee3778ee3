"""Command line: ``onnxptq compile | inspect | eval``.

Exit codes: 0 ok; 1 a quality budget (``--min-*``) was missed (the model is still written);
2 bad input (the message says what and how to fix it; nothing is written); 3 an internal error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click
from rich.console import Console

from onnxptq.errors import EXIT_BAD_INPUT, InputError, OnnxptqError

EXIT_INTERNAL = 3


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise InputError(f"{name} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def _image_options(size, resize, mean, std, layout, scale):
    from onnxptq.data import ImageOptions

    hw = _floats(size, "--image-size")
    if hw is not None and len(hw) != 2:
        raise InputError("--image-size takes H,W, e.g. 224,224")
    return ImageOptions(size=None if hw is None else (int(hw[0]), int(hw[1])), resize=resize,
                        mean=_floats(mean, "--mean") or (0.0, 0.0, 0.0), std=_floats(std, "--std") or (1.0, 1.0, 1.0),
                        layout=layout, scale=scale)


def _write_json(report: dict, path: str | None) -> None:
    if path is None:
        return
    from onnxptq.model_io import write_atomic

    write_atomic((json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode(), path)


image_flags = [
    click.option("--image-size", default=None, help="Images: crop size H,W (default: the model input's)."),
    click.option("--resize", type=int, default=None, help="Images: shorter side before the centre crop."),
    click.option("--mean", default=None, help="Images: per-channel mean after scaling, e.g. 0.485,0.456,0.406."),
    click.option("--std", default=None, help="Images: per-channel std, e.g. 0.229,0.224,0.225."),
    click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True),
    click.option("--pixel-scale", "scale", type=float, default=1 / 255, show_default=True,
                 help="Images: factor applied to 0..255 pixels before mean/std."),
]


def with_image_flags(f):
    for flag in reversed(image_flags):
        f = flag(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxptq")
def cli() -> None:
    """Post-training quantization compiler for ONNX models (QDQ for onnxruntime's integer CPU kernels)."""


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, help="Calibration data: .npz (input name → array, samples on axis 0), "
              "a folder of .npy files, or a folder of images.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the QDQ model.")
@click.option("--w-bits", type=click.Choice(["8", "4", "3", "2"]), default="8", show_default=True,
              help="Weight bits: 8, or 4/3/2 (codes on int8 kernels for --target ort-cpu; packed int4 storage for "
              "ort-cpu-size, int3/int2 at 3/2 bits, and generic-qdq).")
@click.option("--a-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="Bits of the weighted layers' input activations: 8, or 4 (16-code grids; on int8 kernels, uint8 "
              "codes clipped to 0..15 between Q and DQ). Other quantized tensors keep 8 bits.")
@click.option("--first-last-8bit/--no-first-last-8bit", default=True, show_default=True,
              help="Below 8 bits, keep the first and last weighted layers (and their inputs) at 8 bits.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "mse", "entropy"]), default="mse",
              show_default=True, help="How activation ranges are chosen from the calibration statistics.")
@click.option("--percentile", type=float, default=99.999, show_default=True, help="For --calib-method percentile.")
@click.option("--weight-method", type=click.Choice(["minmax", "mse"]), default="mse", show_default=True,
              help="How per-channel weight scales are chosen.")
@click.option("--weight-solver", type=click.Choice(["rtn", "bitsplit", "bitsplit-sequential"]), default="rtn",
              show_default=True, help="rtn: round to nearest; bitsplit: fit 2–4-bit weights to each layer's "
              "response to fp32 inputs (BitSplit); bitsplit-sequential: to inputs from the quantized prefix.")
@click.option("--pipeline", default="light", show_default=True,
              help="Correction passes between the weight grids and emission: light (= bn-reestimate:layers=hidden,"
              "bias-correction), advanced (= adaquant,bn-reestimate:layers=hidden,bias-tuning), or a spec of comma-separated passes, each with "
              "optional :key=value options, run in the order given: bn-reestimate[:target=fp32|bn][:layers=bn|hidden] "
              "(match the per-channel mean/std of each BN-folded, or each hidden, layer's output to the fp32 model's, "
              "or to the BN's β, |γ|), bias-correction (remove each layer's mean output error), "
              "bias-tuning[:steps=N][:lr=F][:batch=N] (bias correction, then all biases trained on the KL of the "
              "model's outputs to fp32; needs `make .venv-training/.installed`, else it stops after bias correction), "
              "adaquant[:mode=parallel|sequential][:iterations=N][:workers=N][:engine=numpy|ort-training] (fit each "
              "layer's weights, bias and steps to its fp32 output; ort-training needs `make .venv-training/.installed`). "
              "Core pass names may "
              "be listed: 'calibration' alone runs no corrections.")
@click.option("--exclude", default=None, help="Regex: nodes whose name or op type matches stay float.")
@click.option("--target", type=click.Choice(["ort-cpu", "ort-cpu-size", "ort-cpu-avx2", "ort-cpu-vnni", "generic-qdq"]),
              default="ort-cpu", show_default=True, help="ort-cpu detects this CPU (speed first: sub-8-bit codes on "
              "int8 kernels); ort-cpu-avx2 gives weights that are exact on every x86 CPU (8-bit codes, scales raised "
              "so no int16 pair saturates); ort-cpu-vnni unconstrained 8-bit for VNNI/AMX x86 and ARM; ort-cpu-size "
              "stores sub-8-bit weights packed as int4 (MatMulNBits for MatMul/Gemm), 3- and 2-bit ones as int3 and int2; "
              "generic-qdq writes plain "
              "opset-21 QDQ with int4/uint4 tensors for other runtimes (no fusion check).")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="4-bit MatMul/Gemm weights under --target ort-cpu-size: weights per float16 scale "
              "along the input axis (onnxruntime's MatMulNBits blocks: 16, 32, 64, 128 or 256). Larger blocks store "
              "fewer scales, smaller ones fit the weights closer.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=int, default=None, help="Calibration samples held back for verification "
              "(default: a fifth, at most 64).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=0, help="onnxruntime threads (0: its default).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--min-coverage", type=float, default=None, help="Exit 1 if fusion coverage is below this.")
@click.option("--min-sqnr", type=float, default=None, help="Exit 1 if any output's SQNR (dB) is below this.")
@click.option("--min-top1", type=float, default=None, help="Exit 1 if any class output's top-1 agreement is below this.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary.")
@click.option("--size-ratio", type=float, default=None, help="Mixed precision: per-layer bits of least predicted "
              "output loss such that the written file is at most this fraction of the fp32 file's bytes.")
@click.option("--bops-ratio", type=float, default=None, help="Mixed precision: as --size-ratio, for bit operations "
              "(MACs × w-bits × a-bits) as a fraction of the fp32 model's (32 × 32 per MAC); add 4-bit input "
              "candidates (--candidates w8a8,w8a4,w4a8,w4a4,w2a8) to let the program halve the a-bits.")
@click.option("--latency-ratio", type=float, default=None, help="Mixed precision: as --size-ratio, for the summed "
              "latency of the weighted layers, each measured alone on this host in its encoding, as a fraction of "
              "their fp32 latency.")
@click.option("--latency-table", type=click.Path(dir_okay=False), default=None, help="--latency-ratio: a JSON file "
              "of the per-layer latencies; measured and written if absent, read back (not re-measured) if present.")
@click.option("--max-drop", type=float, default=None, help="Mixed precision: the smallest file whose predicted output "
              "loss (summed per-layer KL to fp32 for class scores, else 1 − cosine) is at most this.")
@click.option("--candidates", default="w8a8,w4a8,w3a8,w2a8,float", show_default=True,
              help="Mixed precision: each layer's choices, wNaM (weight bits N in 8, 4, 3, 2; bits M of the "
              "layer's input: 8 or 4; layers reading one tensor take 4 together) or float, e.g. "
              "w8a8,w8a4,w4a4,float.")
@click.option("--sweep", type=click.Path(file_okay=False), default=None, help="Mixed precision: also solve a range "
              "of budgets of the same kind and write the Pareto curve (pareto.md, pareto.png) to this folder.")
@click.option("--short-names/--keep-names", default=True, show_default=True,
              help="--target ort-cpu-size: write the values (all but the graph's inputs and outputs) under short names "
              "and name only the quantized nodes, bytes a size budget can give the weights; --keep-names keeps the "
              "source's names.")
@click.option("--pass-effects/--no-pass-effects", default=True, show_default=True,
              help="Measure agreement with fp32 on the held-back samples after every pass that changes the model "
              "(one emission and one run of those samples per pass).")
@with_image_flags
def compile_cmd(model, calib, output, w_bits, a_bits, first_last_8bit, calib_method, percentile, weight_method, weight_solver,
                exclude, target, block_size, seed, holdout, batch_size, threads, json_path, min_coverage, min_sqnr, min_top1, quiet,
                pipeline, size_ratio, bops_ratio, latency_ratio, latency_table, max_drop, candidates, sweep,
                short_names, pass_effects, image_size, resize, mean, std, layout, scale) -> None:
    """Quantize MODEL with calibration data and write a QDQ model."""
    import onnxptq
    from onnxptq.model_io import check_output_path
    from onnxptq.state import Progress
    from onnxptq.summary import print_compile

    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if json_path is not None:
        check_output_path(json_path, [model, calib, output])
    console = Console(stderr=True)
    result = onnxptq.compile(
        model, calib, output, image_options=_image_options(image_size, resize, mean, std, layout, scale),
        progress=None if quiet else Progress(console),
        w_bits=int(w_bits), a_bits=int(a_bits), calib_method=calib_method, percentile=percentile,
        weight_method=weight_method, weight_solver=weight_solver, exclude=exclude, target=target, block_size=block_size, seed=seed,
        holdout=holdout, batch_size=batch_size, threads=threads, pipeline=pipeline, first_last_8bit=first_last_8bit,
        size_ratio=size_ratio, bops_ratio=bops_ratio, latency_ratio=latency_ratio, latency_table=latency_table,
        max_drop=max_drop, candidates=candidates, sweep=sweep, short_names=short_names,
        pass_effects=pass_effects)
    _write_json(result.report, json_path)
    if not quiet:
        print_compile(Console(), result.report, output)
    onnxptq.check_budgets(result.report, min_coverage, min_sqnr, min_top1)


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(model, as_json) -> None:
    """Show MODEL's inputs, outputs, op histogram and quantizable layers."""
    from onnxptq.inspect import inspect_model
    from onnxptq.summary import print_inspect

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        print_inspect(Console(), info)


@cli.command("eval")
@click.argument("fp32", type=click.Path(dir_okay=False))
@click.argument("quantized", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation inputs, in any calibration data form.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model (interleaved).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@with_image_flags
def eval_cmd(fp32, quantized, data, threads, runs, batch_size, json_path, image_size, resize, mean, std, layout,
             scale) -> None:
    """Compare QUANTIZED with FP32: output agreement, size ratio, latency ratio."""
    import onnxptq
    from onnxptq.summary import print_eval

    result = onnxptq.evaluate(fp32, quantized, data, threads=threads, runs=runs, batch_size=batch_size,
                              image_options=_image_options(image_size, resize, mean, std, layout, scale))
    _write_json(result, json_path)
    print_eval(Console(), result)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every failure into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="onnxptq", standalone_mode=False)
        return 0
    except OnnxptqError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        command = f"onnxptq {ctx.info_name}" if ctx is not None and ctx.info_name != "onnxptq" else "onnxptq"
        click.echo(f"error: {exc.format_message()} (see {command} --help)", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("error: interrupted; nothing was written", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        return 130
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if os.environ.get("ONNXPTQ_DEBUG"):
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(set ONNXPTQ_DEBUG=1 for the traceback and please report it)", err=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
