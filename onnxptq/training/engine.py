"""Drives AdaQuant's onnxruntime-training engine from the main process.

onnxruntime-training-cpu (1.19.2, the last release) installs into the same ``onnxruntime`` package
as current onnxruntime, so it lives in its own environment (``make .venv-training/.installed``: Python
3.11, onnxruntime-training-cpu, onnx < 1.17 — whose IR versions onnxruntime 1.19 reads — and numpy),
and ``worker.py`` runs there as a subprocess, one job per layer over a pipe (``protocol``); the rows
stay in their memory-mapped files, which the worker reads directly.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from onnxptq.errors import InputError
from onnxptq.kernels import adaquant
from onnxptq.training import protocol
from onnxptq.training.layer_graph import LayerOp

PYTHON_VARIABLE = "ONNXPTQ_TRAINING_PYTHON"
VENV = ".venv-training"
WORKER = Path(__file__).with_name("worker.py")


def training_python() -> Path:
    """The training environment's Python: ``$ONNXPTQ_TRAINING_PYTHON``, else ``.venv-training`` in the
    checkout onnxptq runs from or in the current directory; an ``InputError`` naming the fix if none."""
    if os.environ.get(PYTHON_VARIABLE):
        candidates = [Path(os.environ[PYTHON_VARIABLE])]
    else:
        candidates = [root / VENV / "bin" / "python" for root in (Path(__file__).resolve().parents[2], Path.cwd())]
    found = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if found is None:
        raise InputError(f"adaquant: engine=ort-training needs the onnxruntime-training environment, not found at "
                         f"{candidates[0]}; create it with `make {VENV}/.installed` in the onnxptq checkout, or set "
                         f"{PYTHON_VARIABLE} to a Python that has onnxruntime-training-cpu==1.19.2 and onnx<1.17")
    return found


class TrainingWorker:
    """One worker process (a context manager); ``fit`` sends it a layer and returns (Fit, seconds)."""

    def __init__(self, python: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="onnxptq-ort-training-"))
        self.log = open(self.folder / "worker.log", "w+")
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([str(python), str(WORKER), adaquant.__file__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.jobs = 0

    def fit(self, problem: adaquant.LayerProblem, op: LayerOp, x_spec: tuple, y_spec: tuple,
            settings: adaquant.Settings, seed: int) -> tuple[adaquant.Fit, float]:
        self.jobs += 1
        folder = self.folder / str(self.jobs)
        folder.mkdir()
        try:
            self.process.stdin.write(protocol.write_job(folder, problem, op, x_spec, y_spec, settings, seed) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except BrokenPipeError:
            answer = ""
        if not answer:
            self.log.seek(0)
            tail = self.log.read().strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"adaquant: the onnxruntime-training worker stopped: {tail[0]}")
        try:
            return protocol.read_fit(answer, folder, adaquant.Fit)
        finally:
            shutil.rmtree(folder)

    def __enter__(self) -> TrainingWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def fit_layers(jobs: Iterable[tuple], workers: int = 1) -> Iterator[tuple[adaquant.Fit, float]]:
    """(Fit, seconds) of every job (problem, op, x_spec, y_spec, settings, seed), in order, fitted by
    ``workers`` worker processes."""
    python = training_python()
    pool: queue.Queue[TrainingWorker] = queue.Queue()
    started = [TrainingWorker(python) for _ in range(max(workers, 1))]
    for worker in started:
        pool.put(worker)

    def one(job: tuple) -> tuple[adaquant.Fit, float]:
        worker = pool.get()
        try:
            return worker.fit(*job)
        finally:
            pool.put(worker)

    try:
        with ThreadPoolExecutor(len(started)) as threads:
            yield from threads.map(one, jobs)
    finally:
        for worker in started:
            worker.__exit__()
