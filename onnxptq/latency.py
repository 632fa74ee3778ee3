"""Latency ratios measured the only way that holds on a shared, noisy machine: interleaved runs of
every model in one process, same input, same thread count, medians compared."""

from __future__ import annotations

import random
import time

import numpy as np
import onnxruntime as ort


def interleaved_latency(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
                        runs: int = 20, warmup: int = 3, seed: int = 0) -> dict[str, float]:
    """Median milliseconds per run of each session; each round runs every session once, in a
    shuffled order, so drifts in machine load hit all of them alike."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(runs):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}
