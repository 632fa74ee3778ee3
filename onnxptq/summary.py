"""Human-readable summaries of compile and eval reports (rich tables on stderr-free stdout)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from onnxptq.passes.kept import NOT_KEPT


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def outputs_table(title: str, outputs: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title, title_justify="left")
    keys = sorted({k for m in outputs.values() for k in m})
    table.add_column("output")
    for k in keys:
        table.add_column(k, justify="right")
    for name, m in outputs.items():
        table.add_row(name, *(_fmt(m.get(k, "")) for k in keys))
    return table


EFFECT_METRICS = ("top1_agreement", "sqnr_db", "cosine", "exact")


def effects_table(effects: list[dict[str, Any]]) -> Table:
    """Agreement with fp32 after each pass that changed the model (``onnxptq/effects.py``): one row per
    pass, one column per output and metric (max |error| left out), and the measurement's seconds."""
    columns = list(dict.fromkeys((name, k) for e in effects for name, m in e["outputs"].items()
                                 for k in EFFECT_METRICS if k in m))
    several = len({name for name, _ in columns}) > 1
    table = Table(title="Agreement with fp32 after each pass", title_justify="left")
    table.add_column("after")
    for name, k in columns:
        table.add_column(f"{name} {k}" if several else k, justify="right")
    table.add_column("s", justify="right")
    for e in effects:
        table.add_row(e["after"], *(_fmt(e["outputs"][name].get(k, "")) for name, k in columns), f"{e['seconds']:.1f}")
    return table


def print_compile(console: Console, report: dict[str, Any], output: str | None) -> None:
    model, ver = report["model"], report["verification"]
    ops = {}
    for layer in report["layers"]:
        ops.setdefault((layer["op"], layer["w_bits"], layer["kernel"]), 0)
        ops[(layer["op"], layer["w_bits"], layer["kernel"])] += 1
    layers = Table(title="Weighted layers", title_justify="left")
    for col in ("op", "w-bits", "runs as", "count"):
        layers.add_column(col, justify="right" if col == "count" else "left")
    for (op, bits, kernel), n in sorted(ops.items()):
        layers.add_row(op, str(bits), kernel or "?", str(n))
    console.print(layers)
    if report.get("mixed"):
        splits = {"head-split": "class head split", "layer-groups": "layer split"}
        for entry in report["passes"]:  # the parts of a split layer are rows of the program
            if entry["name"] in splits:
                for note in entry.get("notes", []):
                    console.print(f"{splits[entry['name']]}: {note}", highlight=False)
        print_mixed(console, report["mixed"])
    console.print(outputs_table(f"Agreement with fp32 on {ver['samples']} "
                                f"{'held-back' if ver['held_back'] else 'calibration'} samples", ver["outputs"]))
    if report.get("effects"):
        console.print(effects_table(report["effects"]))
    for entry in report["passes"]:  # a correction put back is the one pass effect the table cannot show
        for note in entry.get("notes", []):
            if note.startswith(NOT_KEPT):
                console.print(f"{entry['name']} {note}", highlight=False)
    passes = ", ".join(f"{p['name']} {p.get('seconds', 0):.1f}s" for p in report["passes"])
    if ver["coverage"] is None:
        console.print(f"fusion coverage not applicable for target {model.get('target')} (plain QDQ)")
    else:
        console.print(f"fusion coverage [bold]{ver['coverage']:.1%}[/bold] "
                      f"({ver['integer_ops']}/{ver['planned_ops']} quantized ops on integer kernels)")
    sim = ver.get("integer_simulation")
    if sim:
        ops = ", ".join(f"{op} {n}" for op, n in sim["ops"].items())
        console.print(f"integer simulation: {sim['layers']} layers ({ops}), {sim['codes']} outputs, max diff "
                      f"{sim['max_diff']} step(s), {sim['tie_differences']} at rounding ties, "
                      f"[bold]{sim['unexplained']} unexplained[/bold]")
    if model.get("first_last_8bit"):
        console.print(f"first/last layers kept at 8 bits: {', '.join(model['first_last_8bit'])}")
    for left in ver["float_leftovers"]:
        console.print(f"  float: {left['node']} ({left['op']} runs as {left['runs_as']})")
    console.print(f"size {model['bytes'] / 1e6:.2f} MB → {model['quantized_bytes'] / 1e6:.2f} MB "
                  f"({model['size_ratio']:.3f}×), target {model.get('target')}; passes: {passes}")
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if output:
        console.print(f"wrote {output}")


def print_mixed(console: Console, mixed: dict[str, Any]) -> None:
    """The chosen candidate of every layer, the additivity check of the program's loss, and the models
    measured end to end beside it (the nearest fp32 is written)."""
    (budget, value), = mixed["budget"].items()
    console.print(f"mixed precision, {budget.replace('_', ' ')} {value}: " + ", ".join(
        f"{layer['node']} {layer['choice']}" for layer in mixed["layers"]))
    console.print(f"  output loss vs fp32 on {mixed['samples']} samples: predicted (sum over layers) "
                  f"{mixed['predicted_loss']:.4g}, measured (all layers at once) {mixed['measured_loss']:.4g}; "
                  f"size {mixed['size_ratio']:.4f}×, BOPs {mixed['bops_ratio']:.4f}× fp32"
                  + (f", layer latency {mixed['latency_ratio']:.4f}× fp32 (measured per layer)"
                     if "latency_ratio" in mixed else ""))
    if mixed.get("contenders"):
        best = min(mixed["contenders"], key=lambda c: c["measured_loss"])
        console.print("  measured corrected on the calibration set: " + "; ".join(
            f"{c['choice']} {c['measured_loss']:.4g}" + (" (written)" if c is best else "")
            for c in mixed["contenders"]))


def print_eval(console: Console, result: dict[str, Any]) -> None:
    console.print(outputs_table(f"Agreement with fp32 on {result['samples']} samples", result["outputs"]))
    lat = result["latency_ms"]
    console.print(f"size ratio {result['size_ratio']:.3f}×; latency {lat['quantized']:.2f} ms vs fp32 "
                  f"{lat['fp32']:.2f} ms = {result['latency_ratio']:.3f}× ({result['threads']} thread(s), interleaved)")


def print_inspect(console: Console, info: dict[str, Any]) -> None:
    console.print(f"opset {info['opset']}, {info['nodes']} nodes, {info['parameters']:,} parameters, "
                  f"{info['bytes'] / 1e6:.2f} MB")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            console.print(f"{kind[:-1]} {v['name']}: {v['dtype']} {v['shape']}")
    ops = Table(title="Ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    console.print(ops)
    layers = Table(title=f"Quantizable layers ({len(info['layers'])})", title_justify="left")
    for col in ("node", "op", "weight shape", "folded BN"):
        layers.add_column(col)
    for layer in info["layers"]:
        layers.add_row(layer["node"], layer["op"], str(layer["weight_shape"]), "yes" if layer["bn"] else "")
    console.print(layers)
