"""Drives the onnxruntime-training engine (AdaQuant's layers, bias tuning's whole graph) from the main
process.

onnxruntime-training-cpu (1.19.2, the last release) installs into the same ``onnxruntime`` package
as current onnxruntime, so it lives in its own environment (``make .venv-training/.installed``: Python
3.11, onnxruntime-training-cpu, onnx < 1.17 — whose IR versions onnxruntime 1.19 reads — and numpy),
and ``worker.py`` runs there as a subprocess, one job per layer over a pipe (``protocol``); the rows
stay in their memory-mapped files, which the worker reads directly.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from onnxptq.errors import InputError
from onnxptq.kernels import adaquant
from onnxptq.training import protocol
from onnxptq.training.layer_graph import LayerOp

T = TypeVar("T")
PYTHON_VARIABLE = "ONNXPTQ_TRAINING_PYTHON"
VENV = ".venv-training"
WORKER = Path(__file__).with_name("worker.py")


def _candidates() -> list[Path]:
    if os.environ.get(PYTHON_VARIABLE):
        return [Path(os.environ[PYTHON_VARIABLE])]
    return [root / VENV / "bin" / "python" for root in (Path(__file__).resolve().parents[2], Path.cwd())]


def find_training_python() -> Path | None:
    """The training environment's Python: ``$ONNXPTQ_TRAINING_PYTHON``, else ``.venv-training`` in the
    checkout onnxptq runs from or in the current directory; None if there is none."""
    return next((c for c in _candidates() if c.is_file() and os.access(c, os.X_OK)), None)


def training_python() -> Path:
    """``find_training_python``, or an ``InputError`` naming the fix if there is none."""
    found = find_training_python()
    if found is None:
        raise InputError(f"adaquant: engine=ort-training needs the onnxruntime-training environment, not found at "
                         f"{_candidates()[0]}; create it with `make {VENV}/.installed` in the onnxptq checkout, or set "
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
        return self._ask(lambda folder: protocol.write_job(folder, problem, op, x_spec, y_spec, settings, seed),
                         lambda answer, folder: protocol.read_fit(answer, folder, adaquant.Fit))

    def train_graph(self, model: bytes, batches: list[dict[str, np.ndarray]], trainable: list[str],
                    **settings) -> tuple[dict[str, np.ndarray], dict]:
        """Train the ``trainable`` initializers of the serialized loss graph ``model`` (its output: the
        loss) on ``batches`` (``settings``: steps, lr, holdout, check, seed of the worker's
        ``train_graph``): (the values kept, {before, after, fitted_before, fitted_after, step, seconds})."""
        def job(folder: Path) -> str:
            (folder / "loss.onnx").write_bytes(model)
            return protocol.write_graph_job(folder, folder / "loss.onnx", batches, trainable, settings)

        return self._ask(job, protocol.read_trained)

    def _ask(self, write: Callable[[Path], str], read: Callable[[str, Path], T]) -> T:
        """Send the job ``write`` puts in a fresh folder, return ``read`` of the answer."""
        self.jobs += 1
        folder = self.folder / str(self.jobs)
        folder.mkdir()
        try:
            self.process.stdin.write(write(folder) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline()
        except BrokenPipeError:
            answer = ""
        if not answer:
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            self.log.seek(0)
            # its last message, past onnxruntime's info lines
            lines = [line for line in self.log.read().strip().splitlines() if "[I:onnxruntime" not in line]
            died = f"exit code {code}" + (f", signal {-code}" if code is not None and code < 0 else "")
            raise RuntimeError(f"the onnxruntime-training worker stopped ({died}): {(lines or ['no message'])[-1]}")
        try:
            return read(answer, folder)
        finally:
            shutil.rmtree(folder)

    def __enter__(self) -> TrainingWorker:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(BrokenPipeError):  # a worker that died cannot take what is still buffered
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
