"""Checks of the MiniLM example against an independent numpy forward pass; prints a report.

    python -m examples.minilm.check [--skip-ort]

1. The ONNX graph is rebuilt and must serialise to the cached model's bytes (deterministic build).
2. ``reference_embeddings`` recomputes the sentence-transformers pipeline in float64 numpy directly
   from the safetensors weights (PyTorch ``[out, in]`` layout, token types and positions gathered
   explicitly); the max abs difference to onnxruntime's fp32 outputs is reported and bounded.
3. Cosine similarities of related sentence pairs must exceed those of unrelated pairs.
4. Eval-set timing (1 thread) and the probe's fp32 spam accuracy.
5. For reference only: onnxruntime's ``quantize_static`` (QDQ, per-channel, u8 activations, s8
   weights, MinMax) calibrated on ``calibration_set(64)``, its accuracy and cosine agreement.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from examples.common import run_model
from examples.minilm import example as ex

_erf = np.vectorize(math.erf, otypes=[np.float64])

# (sentence, sentence, related?)
_PAIRS = (
    ("A man is playing a guitar.", "Someone is strumming an acoustic guitar.", True),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", True),
    ("How do I reset my password?", "I forgot my login password, how can I change it?", True),
    ("A man is playing a guitar.", "The central bank raised interest rates again.", False),
    ("The cat sleeps on the sofa.", "Compile the kernel with debugging symbols.", False),
    ("How do I reset my password?", "Fresh tomatoes are best in late summer.", False),
)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ex.LN_EPS) * gamma + beta


def reference_embeddings(w: dict[str, np.ndarray], input_ids: np.ndarray,
                         attention_mask: np.ndarray) -> np.ndarray:
    """BERT encoder + mean pooling + L2 normalisation in float64, as Hugging Face computes it."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    n, t = input_ids.shape
    positions = np.arange(t)
    types = np.zeros_like(input_ids)
    x = (w["embeddings.word_embeddings.weight"][input_ids]
         + w["embeddings.token_type_embeddings.weight"][types]
         + w["embeddings.position_embeddings.weight"][positions])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    mask = attention_mask.astype(np.float64)
    bias = ((1.0 - mask) * ex.MASK_BIAS)[:, None, None, :]
    for i in range(ex.LAYERS):
        p = f"encoder.layer.{i}"

        def heads(y: np.ndarray) -> np.ndarray:
            return y.reshape(n, t, ex.HEADS, ex.HEAD_DIM).transpose(0, 2, 1, 3)

        q, k, v = (heads(linear(x, f"{p}.attention.self.{s}")) for s in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(ex.HEAD_DIM) + bias
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, t, ex.HIDDEN)
        x = _layer_norm(linear(ctx, f"{p}.attention.output.dense") + x,
                        w[f"{p}.attention.output.LayerNorm.weight"],
                        w[f"{p}.attention.output.LayerNorm.bias"])
        h = linear(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _layer_norm(linear(h, f"{p}.output.dense") + x, w[f"{p}.output.LayerNorm.weight"],
                        w[f"{p}.output.LayerNorm.bias"])
    pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True),
                                                              ex.POOL_EPS)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), ex.NORM_EPS)


def check_deterministic(model: Path) -> None:
    """Rebuilding the graph gives byte-identical ONNX."""
    rebuilt = ex._GraphBuilder(ex.load_weights()).build().SerializeToString()
    assert rebuilt == model.read_bytes(), "rebuilt model differs from the cached one"
    print(f"deterministic build: ok ({len(rebuilt)} bytes)")


def check_reference(model: Path) -> None:
    """ONNX (onnxruntime, fp32) vs the float64 numpy reference on sentences and eval e-mails."""
    inputs, _ = ex.eval_set()
    sentences = ex.tokenize([s for pair in _PAIRS for s in pair[:2]])
    feeds = {k: np.concatenate([sentences[k], inputs[k][:8]]) for k in sentences}
    onnx_out = run_model(model, feeds)[0]
    ref = reference_embeddings(ex.load_weights(), feeds["input_ids"], feeds["attention_mask"])
    diff = float(np.abs(onnx_out - ref).max())
    print(f"max |onnx - numpy reference| over {len(ref)} inputs: {diff:.3g}")
    assert diff < 1e-4, diff


def check_sentences(model: Path) -> None:
    """Related pairs must be more similar than every unrelated pair."""
    emb = run_model(model, ex.tokenize([s for pair in _PAIRS for s in pair[:2]]))[0]
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    for (a, b, related), c in zip(_PAIRS, cos, strict=True):
        print(f"  cos {c:+.3f} {'related  ' if related else 'unrelated'} {a!r} / {b!r}")
    related = np.array([p[2] for p in _PAIRS])
    assert cos[related].min() > cos[~related].max(), cos


def _ort_quantize(model: Path, out: Path) -> None:
    """onnxruntime's quantize_static: QDQ, per-channel s8 weights, u8 activations, MinMax."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    calib = ex.calibration_set(64)

    class Reader(CalibrationDataReader):
        """Feeds the calibration e-mails one at a time."""

        def __init__(self) -> None:
            n = len(calib["input_ids"])
            self.feeds = iter({k: v[i:i + 1] for k, v in calib.items()} for i in range(n))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-ort", action="store_true", help="skip ORT quantize_static")
    args = parser.parse_args()
    start = time.perf_counter()
    model = ex.fp32_model()
    print(f"fp32_model: {time.perf_counter() - start:.1f} s")
    check_deterministic(model)
    check_reference(model)
    check_sentences(model)

    start = time.perf_counter()
    inputs, labels = ex.eval_set()
    print(f"eval_set: {len(labels.is_spam)} e-mails ({int(labels.is_spam.sum())} spam), "
          f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    fp32_out = run_model(model, inputs)
    print(f"fp32 eval run (1 thread): {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    fp32_metrics = ex.metrics(fp32_out, labels)
    print(f"fp32 metrics (incl. probe fit if not cached): {time.perf_counter() - start:.1f} s")
    print(f"fp32: {fp32_metrics}")
    if args.skip_ort:
        return
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "ort_qdq.onnx"
        start = time.perf_counter()
        _ort_quantize(model, q)
        print(f"ORT quantize_static: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        q_out = run_model(q, inputs)
        print(f"ORT QDQ eval run (1 thread): {time.perf_counter() - start:.1f} s")
        print(f"ORT QDQ: {ex.metrics(q_out, labels)} {ex.agreement(fp32_out, q_out)}")


if __name__ == "__main__":
    main()
