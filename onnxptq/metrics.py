"""How closely one model's outputs follow another's."""

from __future__ import annotations

import numpy as np


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σ ref² / Σ (ref − test)²), in dB (inf if exact)."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def sample_cosines(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity of the two outputs per sample (axis 0), each flattened; 1 where either is 0."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(test, np.float64).reshape(len(test), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-30), 1.0)


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    """Cosine similarity of the two outputs, flattened per sample and averaged over samples."""
    return float(sample_cosines(ref, test).mean())


def is_classifier_like(output: np.ndarray) -> bool:
    """Scores over classes on the last axis: float, rank ≥ 2, more than one class."""
    return output.ndim >= 2 and output.shape[-1] > 1 and np.issubdtype(output.dtype, np.floating)


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """Fraction of positions (all but the last axis) where both outputs pick the same class."""
    return float((np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)).mean())


def compare_outputs(names: list[str], ref: list[np.ndarray], test: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per-output agreement: SQNR, cosine, max |error|, and top-1 agreement for class scores."""
    result = {}
    for name, r, t in zip(names, ref, test):
        if not np.issubdtype(r.dtype, np.floating):
            result[name] = {"exact": float(np.mean(r == t))}
            continue
        entry = {"sqnr_db": round(sqnr_db(r, t), 3), "cosine": round(cosine(r, t), 6),
                 "max_abs_error": float(np.abs(r.astype(np.float64) - t).max())}
        if is_classifier_like(r):
            entry["top1_agreement"] = round(top1_agreement(r, t), 6)
        result[name] = entry
    return result


def log_probabilities(scores: np.ndarray, normalized: bool = False) -> np.ndarray:
    """log p over the last axis, in float64: of probabilities as given (``normalized``, floored at
    1e-12 so a zero stays finite) or of logits by log-softmax, log p_i = x_i − log Σ_j e^{x_j}."""
    x = np.asarray(scores, np.float64)
    if normalized:
        return np.log(np.maximum(x, 1e-12))
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(ref: np.ndarray, test: np.ndarray, normalized: bool = False) -> np.ndarray:
    """KL(p_ref ‖ p_test) = Σ_i p_ref,i·(log p_ref,i − log p_test,i) over the last axis, at every other
    position; inputs are logits, or probabilities when ``normalized``."""
    log_p, log_q = log_probabilities(ref, normalized), log_probabilities(test, normalized)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def mean_kl(ref: np.ndarray, test: np.ndarray, normalized: bool = False) -> float:
    """``kl_divergence`` averaged over all positions."""
    return float(kl_divergence(ref, test, normalized).mean())
