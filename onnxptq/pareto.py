"""The Pareto curve of a mixed-precision sweep: a markdown table and a PNG plot of predicted and
measured output loss against the emitted file size (or the BOPs, or the summed layer latency, for a
sweep over those)."""

from __future__ import annotations

import io
from pathlib import Path

from onnxptq.errors import InputError
from onnxptq.model_io import write_atomic


def write_sweep(directory: str, budget: str, points: list[dict]) -> None:
    """``pareto.md`` (a table) and ``pareto.png`` (predicted and measured ΔL against the emitted size,
    or the BOPs for a BOPs sweep) in ``directory``, each written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--sweep draws its plot with matplotlib: pip install matplotlib") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Pareto sweep over {budget.replace('_', ' ')}: the integer program at {len(points)} limits.\n",
             "| limit | predicted ΔL | measured ΔL (jointly) | size × fp32 (emitted) | BOPs × fp32 | choices |",
             "|---|---|---|---|---|---|"]
    for p in points:
        choices = ", ".join(f"{k} ×{n}" for k, n in p["choices"].items() if n)
        lines.append(f"| {p['limit']:.6g} | {p['predicted_loss']:.4g} | {p['measured_loss']:.4g} | "
                     f"{p['size_ratio']:.4f} | {p['bops_ratio']:.5f} | {choices} |")
    write_atomic(("\n".join(lines) + "\n").encode(), out / "pareto.md")
    x_key = budget if budget in ("bops_ratio", "latency_ratio") else "size_ratio"
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[x_key] for p in points]
    ax.plot(xs, [p["predicted_loss"] for p in points], "o-", label="predicted (Σ per-layer ΔL)")
    ax.plot(xs, [p["measured_loss"] for p in points], "s--", label="measured (all layers at once)")
    ax.set_xlabel({"bops_ratio": "BOPs × fp32", "latency_ratio": "summed layer latency × fp32 (measured per layer)",
                   "size_ratio": "file size × fp32 (emitted)"}[x_key])
    ax.set_ylabel("output loss vs fp32 (KL or 1 − cosine)")
    if all(p[k] > 0 for p in points for k in ("predicted_loss", "measured_loss")):
        ax.set_yscale("log")  # the losses span orders of magnitude from the smallest file to 8 bits
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    write_atomic(buffer.getvalue(), out / "pareto.png")
