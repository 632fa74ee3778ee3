"""onnxruntime sessions, configured the same way everywhere onnxptq runs a model."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(model: onnx.ModelProto | bytes | str, threads: int = 0, level: str = "all",
            optimized_path: str | None = None) -> ort.InferenceSession:
    """A CPU session; ``threads`` = 0 lets onnxruntime choose; spinning is off so that two sessions
    timed in turn on a shared machine do not steal each other's cores."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, feeds: Iterable[dict[str, np.ndarray]],
            outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``sess`` on every feed and concatenate each output over the batches."""
    chunks = [sess.run(outputs, feed) for feed in feeds]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
