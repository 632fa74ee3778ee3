"""Magika content-type classifier (Google), shipped as ONNX in PyPI ``magika``.

The model is ``magika/models/standard_v3_3/model.onnx`` from the ``magika==1.0.3`` wheel (read from
the unpacked archive, never installed), kept exactly as shipped: a tf2onnx export of a JAX model,
input ``bytes`` is int32 ``[N, 2048]`` (1024 leading + 1024 trailing byte values, 256 = padding),
output ``target_label`` is ``[N, 214]`` softmax probabilities over ``target_labels_space``.

The graph starts with a one-hot encoding built from plain ops: ``Reshape`` the ints to
``[N, 2048, 1]``, ``Expand`` and ``Equal`` against the constant range ``0..256``, ``Cast`` to float:
a ``[N, 2048, 257]`` 0/1 tensor, followed by a ``MatMul`` with a ``[257, 64]`` weight (a byte
embedding written as a dense layer) and a bias. Then tanh-GELU, ``Reshape`` to ``[N, 512, 256]``,
LayerNorm, a ``Conv`` with kernel ``[5, 1]`` (512 -> 512 channels), GELU, global max pooling,
LayerNorm, a ``[512, 214]`` dense layer and a softmax, all spelled out in elementary ops. The model
imports the ``ai.onnx.ml`` opset but has no node from it; only default-domain ops are used.

Features follow magika's own extraction (``Magika._extract_features_from_seekable``), driven by
the wheel's ``config.min.json``: read at most ``block_size`` bytes at each end of the file, strip
leading (resp. trailing) whitespace, keep the first ``beg_size`` (resp. last ``end_size``) bytes and
pad with ``padding_token`` at the end (resp. start). Files that magika would not send to the model
(fewer than ``min_file_size_for_dl`` bytes after stripping) are skipped.

Data are files of known types found on the machine, labelled from their extension. Sources are
scanned in order of portability: the Python standard library, the installed numpy, onnx,
onnxruntime and pip packages, then ``/usr/share`` and ``/usr/include``. Selection is deterministic:
per type, files are ordered by source, then by a hash of their source-relative path; files with
byte-identical features are used once. The same hash splits files between eval and calibration.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from examples.common import CACHE, fetch_pypi, write_atomic

NAME = "magika"
PRIMARY = "top1"
HIGHER_IS_BETTER = True

_PKG = ("magika", "1.0.3")
_MODEL_DIR = "magika/models/standard_v3_3"
INPUT = "bytes"

# Files per content type in the eval set and in the calibration pool.
EVAL_PER_TYPE = 40
CALIB_PER_TYPE = 8
# One path hash in this many goes to the calibration pool, the rest to the eval set.
_CALIB_EVERY = 5

# Extension (lower case) -> magika label. Only extensions whose content type is unambiguous.
_EXTENSIONS = {
    ".awk": "awk", ".bat": "batch", ".bmp": "bmp", ".bz2": "bzip", ".c": "c", ".cc": "cpp",
    ".cpp": "cpp", ".cmake": "cmake", ".css": "css", ".csv": "csv", ".exe": "pebin",
    ".f90": "fortran", ".gif": "gif", ".gz": "gzip", ".htm": "html", ".html": "html",
    ".ini": "ini", ".jar": "jar", ".jpeg": "jpeg", ".jpg": "jpeg", ".js": "javascript",
    ".json": "json", ".m4": "m4", ".md": "markdown", ".npy": "npy", ".npz": "npz",
    ".onnx": "onnx", ".pdf": "pdf", ".pem": "pem", ".pl": "perl", ".pm": "perl", ".png": "png",
    ".proto": "proto", ".ps": "postscript", ".py": "python", ".pyc": "pythonbytecode",
    ".rst": "rst", ".sh": "shell", ".so": "elf", ".sql": "sql", ".svg": "svg", ".tar": "tar",
    ".tcl": "tcl", ".toml": "toml", ".ttf": "ttf", ".txt": "txt", ".wav": "wav", ".xml": "xml",
    ".xz": "xz", ".yaml": "yaml", ".yml": "yaml", ".zip": "zip",
}
_FILE_NAMES = {"Makefile": "makefile"}


# --------------------------------------------------------------------------------------------------
# Model and config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureConfig:
    """The feature-extraction parameters and label space of ``config.min.json``."""

    beg_size: int
    mid_size: int
    end_size: int
    padding_token: int
    block_size: int
    min_file_size_for_dl: int
    use_inputs_at_offsets: bool
    target_labels: tuple[str, ...]


def _model_dir() -> Path:
    """The unpacked ``standard_v3_3`` model folder of the magika wheel."""
    return fetch_pypi(*_PKG) / _MODEL_DIR


@functools.cache
def feature_config() -> FeatureConfig:
    """The wheel's ``config.min.json``; only the extraction magika 1.0.3 implements is accepted."""
    raw = json.loads((_model_dir() / "config.min.json").read_text())
    config = FeatureConfig(
        beg_size=raw["beg_size"], mid_size=raw["mid_size"], end_size=raw["end_size"],
        padding_token=raw["padding_token"], block_size=raw["block_size"],
        min_file_size_for_dl=raw["min_file_size_for_dl"],
        use_inputs_at_offsets=raw["use_inputs_at_offsets"],
        target_labels=tuple(raw["target_labels_space"]))
    if (config.mid_size != 0 or config.use_inputs_at_offsets
            or not config.beg_size < config.block_size or not config.end_size < config.block_size):
        raise ValueError(f"unsupported magika feature config: {config}")
    return config


def fp32_model() -> Path:
    """Return (copying once, cached) magika's ``standard_v3_3`` ONNX model, unchanged."""
    path = CACHE / "models" / f"{NAME}_fp32.onnx"
    if path.is_file():
        return path
    return write_atomic(path, (_model_dir() / "model.onnx").read_bytes())


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def extract_features(path: Path, config: FeatureConfig) -> np.ndarray | None:
    """Magika's model input for one file, int32 ``[beg_size + end_size]``.

    Returns ``None`` when magika would not run the model: fewer than ``min_file_size_for_dl``
    bytes remain at the start of the file once leading whitespace is stripped.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        count = min(config.block_size, size)
        f.seek(0)
        beg = f.read(count).lstrip()[:config.beg_size]
        f.seek(size - count)
        end = f.read(count).rstrip()
    end = end[max(0, len(end) - config.end_size):]
    if len(beg) < config.min_file_size_for_dl:
        return None
    pad = config.padding_token
    return np.array([*beg, *[pad] * (config.beg_size - len(beg)),
                     *[pad] * (config.end_size - len(end)), *end], dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _sources() -> list[tuple[str, Path]]:
    """Folders to scan as ``(tag, folder)``, most portable first.

    A file is identified by its folder's tag and its path inside the folder, independent of where
    Python or the packages are installed.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [("stdlib", stdlib)]
    for package in ("numpy", "onnx", "onnxruntime", "pip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            sources.append((package, Path(spec.origin).parent))
    sources += [("usr-share", Path("/usr/share")), ("usr-include", Path("/usr/include"))]
    return [(tag, folder) for tag, folder in sources if folder.is_dir()]


def _label(name: str) -> str | None:
    """The magika label implied by a file name, if it is one of the mapped types."""
    return _FILE_NAMES.get(name) or _EXTENSIONS.get(os.path.splitext(name)[1].lower())


@dataclass(frozen=True)
class _Candidate:
    """A labelled file: ``key`` is its source tag plus source-relative path."""

    key: str
    path: Path
    label: str
    rank: tuple[int, str]


def _candidates() -> dict[str, list[_Candidate]]:
    """Labelled regular files of all sources, per label, ordered by source then path hash."""
    skip = {"site-packages", "dist-packages"}
    found: dict[str, list[_Candidate]] = {}
    for priority, (tag, root) in enumerate(_sources()):
        for folder, dirs, files in os.walk(root):
            # Third-party packages inside the stdlib folder are not scanned as stdlib files.
            dirs[:] = sorted(d for d in dirs if not (tag == "stdlib" and d in skip))
            for name in sorted(files):
                label = _label(name)
                path = Path(folder, name)
                if label is None or path.is_symlink() or not path.is_file():
                    continue
                key = f"{tag}/{path.relative_to(root).as_posix()}"
                digest = hashlib.sha256(key.encode()).hexdigest()
                found.setdefault(label, []).append(_Candidate(key, path, label, (priority, digest)))
    return {label: sorted(c, key=lambda c: c.rank) for label, c in sorted(found.items())}


@dataclass(frozen=True)
class _Sample:
    """One selected file: its key, label and model input."""

    key: str
    label: str
    features: np.ndarray


def _is_calibration(key: str) -> bool:
    """Whether a file goes to the calibration pool (by a hash independent of the ordering hash)."""
    return int(hashlib.sha256(f"split:{key}".encode()).hexdigest(), 16) % _CALIB_EVERY == 0


@functools.cache
def _selection() -> tuple[list[_Sample], list[_Sample]]:
    """``(eval, calibration)`` samples, per label in ``_candidates`` order.

    Files that magika would not run the model on, that cannot be read, or whose features equal an
    earlier file's are skipped, so no feature vector appears twice across both sets.
    """
    config = feature_config()
    evals: list[_Sample] = []
    calib: list[_Sample] = []
    seen: set[bytes] = set()
    for label, candidates in _candidates().items():
        n_eval = n_calib = 0
        for c in candidates:
            if n_eval >= EVAL_PER_TYPE and n_calib >= CALIB_PER_TYPE:
                break
            to_calib = _is_calibration(c.key)
            if (n_calib if to_calib else n_eval) >= (CALIB_PER_TYPE if to_calib else EVAL_PER_TYPE):
                continue
            try:
                features = extract_features(c.path, config)
            except OSError:
                continue
            if features is None or features.tobytes() in seen:
                continue
            seen.add(features.tobytes())
            if to_calib:
                calib.append(_Sample(c.key, label, features))
                n_calib += 1
            else:
                evals.append(_Sample(c.key, label, features))
                n_eval += 1
    return evals, calib


def eval_files() -> list[tuple[str, str]]:
    """``(source-relative path, label)`` of every eval sample, in eval-set order."""
    return [(s.key, s.label) for s in _selection()[0]]


def eval_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Eval features ``bytes`` (int32 ``[N, 2048]``) and labels (indices of the model classes)."""
    samples = _selection()[0]
    index = {name: i for i, name in enumerate(feature_config().target_labels)}
    return ({INPUT: np.stack([s.features for s in samples])},
            np.array([index[s.label] for s in samples], dtype=np.int64))


def calibration_set(n: int = 64) -> dict[str, np.ndarray]:
    """``n`` calibration samples, taken round-robin over the content types of the pool."""
    by_label: dict[str, list[np.ndarray]] = {}
    for s in _selection()[1]:
        by_label.setdefault(s.label, []).append(s.features)
    groups = list(by_label.values())
    pool = [g[i] for i in range(CALIB_PER_TYPE) for g in groups if i < len(g)]
    if not 0 < n <= len(pool):
        raise ValueError(f"calibration_set supports 1..{len(pool)} samples, got {n}")
    return {INPUT: np.stack(pool[:n])}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def sample_errors(outputs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Per file: 1 where the predicted content type is not the extension-derived label, else 0."""
    return (outputs[0].argmax(axis=1) != labels).astype(np.float64)


def metrics(outputs: list[np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy of the model's content-type prediction: 1 − mean ``sample_errors``."""
    return {"top1": 1.0 - float(np.mean(sample_errors(outputs, labels)))}


def agreement(fp32_outputs: list[np.ndarray], q_outputs: list[np.ndarray]) -> dict[str, float]:
    """Fraction of files whose predicted content type is the same for fp32 and quantized."""
    return {"top1_agreement": float(np.mean(fp32_outputs[0].argmax(axis=1)
                                            == q_outputs[0].argmax(axis=1)))}
