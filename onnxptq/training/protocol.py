"""The messages between the main process and the training worker: one JSON line each way per job,
arrays in an .npz file beside it. Only numpy and the standard library, so both environments read it.
A job is one AdaQuant layer, or (``"kind": "graph"``) a whole loss graph whose named initializers are
trained (bias tuning).

The rows themselves stay in the files the pass wrote (``open_rows``), which the worker maps too.
A job names the layer problem (a ``kernels.adaquant.LayerProblem``: arrays to the .npz, the rest to
JSON), the layer's operator, its row files, the ``Settings`` and the seed; the answer carries the
``Fit`` (θ to the .npz) or an error message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TUPLES = ("w_range", "x_range", "bound", "kernel")
RowSpec = tuple[str, tuple[int, ...]]  # (path, shape) of a finished row file (onnxptq/capture.py's RowFile)


def open_rows(spec: RowSpec) -> np.ndarray:
    """The float32 rows of a row file, memory-mapped."""
    return np.memmap(spec[0], np.float32, "r", shape=spec[1])


def row_reader(x_spec: RowSpec, y_spec: RowSpec) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``rows(index)`` → (x [G, B, K], y [B, M]) of a layer's row files (x stored [R, G, K]), as
    ``kernels.adaquant`` reads them."""
    x, y = open_rows(x_spec), open_rows(y_spec)
    return lambda index: (np.ascontiguousarray(x[index].transpose(1, 0, 2)), np.asarray(y[index]))


def _split(obj: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """A dataclass's fields as (JSON-able values, arrays)."""
    plain, arrays = {}, {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        else:
            plain[f.name] = value
    return plain, arrays


def _dumps(value: Any) -> str:
    """JSON of ``value``; numpy scalars as Python numbers (non-finite floats as JSON's Infinity/NaN)."""
    return json.dumps(value, default=lambda o: o.item())


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if k in TUPLES and v is not None else v for k, v in values.items()}


def write_job(folder: Path, problem: Any, op: Any, x_spec: tuple, y_spec: tuple, settings: Any,
              seed: int) -> str:
    """The JSON line of one job (its arrays written to ``folder``/job.npz)."""
    plain, arrays = _split(problem)
    np.savez(folder / "job.npz", **arrays)
    return _dumps({"folder": str(folder), "problem": plain, "op": dataclasses.asdict(op),
                       "x_spec": x_spec, "y_spec": y_spec, "settings": dataclasses.asdict(settings),
                       "seed": seed})


def read_job(line: str, problem_cls: type, op_cls: type, settings_cls: type) -> dict:
    """The job of a JSON line: folder, problem, op, x_spec, y_spec, settings, seed."""
    job = json.loads(line)
    folder = Path(job["folder"])
    with np.load(folder / "job.npz") as arrays:
        problem = problem_cls(**_tuples(job["problem"]), **{k: arrays[k] for k in arrays.files})
    spec = lambda s: (s[0], tuple(s[1]))  # noqa: E731
    return {"folder": folder, "problem": problem, "op": op_cls(**_tuples(job["op"])), "x_spec": spec(job["x_spec"]),
            "y_spec": spec(job["y_spec"]), "settings": settings_cls(**job["settings"]), "seed": job["seed"]}


def write_fit(folder: Path, fit: Any, seconds: float) -> str:
    """The JSON line answering a job (θ written to ``folder``/theta.npz)."""
    plain, _ = _split(fit)
    np.savez(folder / "theta.npz", **fit.theta)
    plain.pop("theta")
    return _dumps({"fit": plain, "seconds": seconds})


def write_error(message: str) -> str:
    return _dumps({"error": message})


def read_fit(line: str, folder: Path, fit_cls: type) -> tuple[Any, float]:
    """(fit, seconds) of an answer; raises RuntimeError with the worker's message on an error."""
    answer = json.loads(line)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    with np.load(folder / "theta.npz") as arrays:
        theta = {k: arrays[k] for k in arrays.files}
    return fit_cls(theta=theta, **answer["fit"]), answer["seconds"]


def write_graph_job(folder: Path, model: Path, batches: list[dict[str, np.ndarray]], trainable: list[str],
                    settings: dict[str, Any]) -> str:
    """The JSON line of a whole-graph training job (bias tuning): the loss graph at ``model``, its
    input batches (written to ``folder``/batches.npz), the initializers to train, and ``settings``
    (steps, lr, holdout, check, seed: the worker's ``train_graph``)."""
    np.savez(folder / "batches.npz", **{f"{i}/{name}": array for i, batch in enumerate(batches)
                                        for name, array in batch.items()})
    return _dumps({"kind": "graph", "folder": str(folder), "model": str(model), "batches": len(batches),
                   "trainable": trainable, **settings})


def read_graph_job(job: dict) -> dict:
    """A decoded graph job with its ``batches`` read back as a list of feed dicts."""
    folder = Path(job["folder"])
    batches: list[dict[str, np.ndarray]] = [{} for _ in range(job["batches"])]
    with np.load(folder / "batches.npz") as arrays:
        for key in arrays.files:
            index, name = key.split("/", 1)
            batches[int(index)][name] = arrays[key]
    return {**job, "folder": folder, "batches": batches}


def write_trained(folder: Path, parameters: dict[str, np.ndarray], info: dict) -> str:
    """The JSON line answering a graph job (the trained values written to ``folder``/trained.npz)."""
    np.savez(folder / "trained.npz", **parameters)
    return _dumps({"trained": info})


def read_trained(line: str, folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(trained values, info) of a graph job's answer; raises RuntimeError with the worker's message."""
    answer = json.loads(line)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    with np.load(folder / "trained.npz") as arrays:
        return {k: arrays[k] for k in arrays.files}, answer["trained"]
