"""Two quantized models compared sample by sample on an example's eval set: is the difference real?

    python -m benchmarks.paired EXAMPLE A.onnx B.onnx

Per eval sample, each model's distance to the fp32 outputs (KL(p_fp32 ‖ p) for class scores, averaged
over positions such as PP-OCR's time steps; else 1 − cosine) and its top-1 agreement with fp32 (the
fraction of positions whose argmax is fp32's; class scores and probabilities only). For each measure: both means, how
many samples favour A and how many B, the two-sided sign-test p-value of that split (the chance of a
split at least as uneven if neither model were better: 2·P[X ≤ min(a, b)], X ~ Binomial(a + b, ½)),
and for the distance a 95% bootstrap interval of mean(d_A − d_B) (2000 resamples, seed 0). For class
scores also fp32's own top-1 margin, p₁ − p₂: the share of positions below 0.05, and its median where
A and B disagree on the argmax — near-ties that any rounding flips. One JSON line per output, and one
for the task: the same split of each example's error per sample against its labels
(``sample_errors``: a wrong top-1 class, file type or spam call, or PP-OCRv4's character error rate per
line), under the name of the metric it makes up (``task_error_of``).

The sign test and the bootstrap take the samples as independent. EfficientNet-Lite0's eval images are
crops and mirror images of a few photos, which tend to flip together, so its p-values and intervals
come out narrower than they are; magika's files and MiniLM's emails are separate documents.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math

import numpy as np

from benchmarks.run import EXAMPLES, VARIANTS
from onnxptq.metrics import kl_divergence, log_probabilities, sample_cosines

BOOTSTRAP = 2000
NEAR_TIE = 0.05


def sign_test(a: int, b: int) -> float:
    """Two-sided sign-test p-value of ``a`` samples favouring one side and ``b`` the other."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def probabilities(scores: np.ndarray) -> bool:
    """Whether ``scores`` hold probabilities over their last axis (non-negative, each row summing to 1):
    class scores even where the graph computes its softmax from basic ops (magika)."""
    return scores.ndim >= 2 and bool(np.all(scores >= 0)) and bool(np.allclose(scores.sum(axis=-1), 1, atol=1e-3))


def per_sample(ref: np.ndarray, test: np.ndarray, normalized: bool | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(distance, top-1 agreement) per sample: KL for class scores (``normalized`` True/False as
    ``float_outputs`` says), else 1 − cosine; argmax agreement averaged over a sample's positions for
    class scores and probabilities (else None: an embedding's argmax means nothing)."""
    n = len(ref)
    agree = ((np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)).reshape(n, -1).mean(axis=1)
             if normalized is not None or probabilities(ref) else None)
    if normalized is None:
        return 1.0 - sample_cosines(ref, test), agree
    return kl_divergence(ref, test, normalized).reshape(n, -1).mean(axis=1), agree


def split(a: np.ndarray, b: np.ndarray, lower_is_better: bool) -> dict:
    """Means of ``a`` and ``b``, the samples favouring each and the sign test's p-value."""
    better_a, better_b = (a < b, a > b) if lower_is_better else (a > b, a < b)
    wins_a, wins_b = int(better_a.sum()), int(better_b.sum())
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "samples_favouring_a": wins_a,
            "samples_favouring_b": wins_b, "sign_test_p": round(sign_test(wins_a, wins_b), 4)}


def main() -> None:
    from benchmarks.compile_one import fail
    from examples.common import run_model
    from onnxptq.errors import InputError
    from onnxptq.model_io import load_model, to_ir
    from onnxptq.passes.sensitivity import float_outputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=[*EXAMPLES, *VARIANTS])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    ex = importlib.import_module(f"examples.{args.example}.example")
    fp32 = str(ex.fp32_model())
    names, normalized = float_outputs(to_ir(load_model(fp32)))
    try:  # both models are read before any runs: a bad path is a one-line error at once
        graph_outputs = {m: [o.name for o in load_model(m).graph.output] for m in (fp32, args.a, args.b)}
    except InputError as exc:
        fail(str(exc))
    inputs, labels = ex.eval_set()
    runs = {m: dict(zip(graph_outputs[m], run_model(m, inputs))) for m in (fp32, args.a, args.b)}
    rng = np.random.default_rng(0)
    for name, kind in zip(names, normalized):
        ref = runs[fp32][name]
        (dist_a, agree_a), (dist_b, agree_b) = (per_sample(ref, runs[m][name], kind) for m in (args.a, args.b))
        diff = dist_a - dist_b
        boot = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
        row = {"output": name, "samples": len(ref), "a": args.a, "b": args.b,
               "distance": "kl" if kind is not None else "1-cosine",
               **{f"distance_{k}": v for k, v in split(dist_a, dist_b, lower_is_better=True).items()},
               "distance_diff_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}
        if agree_a is not None:
            row.update({f"top1_{k}": v for k, v in split(agree_a, agree_b, lower_is_better=False).items()})
        if kind is not None:
            p = np.sort(np.exp(log_probabilities(ref, kind)), axis=-1)
            margin = p[..., -1] - p[..., -2]
            flips = np.argmax(runs[args.a][name], axis=-1) != np.argmax(runs[args.b][name], axis=-1)
            row.update(fp32_margin_below_005=float((margin < NEAR_TIE).mean()),
                       fp32_margin_median_where_a_b_differ=float(np.median(margin[flips])) if flips.any() else None)
        print(json.dumps(row))
    errors = {m: ex.sample_errors([runs[m][o] for o in graph_outputs[m]], labels) for m in (args.a, args.b)}
    print(json.dumps({"task_error_of": ex.PRIMARY, "samples": len(errors[args.a]), "a": args.a, "b": args.b,
                      **split(errors[args.a], errors[args.b], lower_is_better=True)}))


if __name__ == "__main__":
    main()
