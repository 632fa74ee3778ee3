"""Calibration data: loading, validation against the model's inputs, and batching.

The canonical form is a mapping input name → array whose axis 0 indexes samples. It can come from an
``.npz`` file, a folder of ``.npy`` files, a folder of images (with preprocessing options), or in the
Python API any object following onnxruntime's ``CalibrationDataReader`` protocol (``get_next()``
returning a feed dict, then ``None``).

How samples meet the model's input shape: if the array has one more axis than the model input, each
sample is fed alone (a leading axis of 1 is added back where the model has one); if it has the same
rank, axis 0 is the model's batch axis and samples are fed in batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from onnxptq.errors import InputError

_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
               onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
               onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class CalibrationDataReader(Protocol):
    """onnxruntime's reader protocol: ``get_next()`` returns one feed dict, then ``None``."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration sees it: name, numpy dtype and shape (None for free dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> list["InputSpec"]:
        inits = {i.name for i in model.graph.initializer}
        specs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
            specs.append(cls(vi.name, np.dtype(_ONNX_TO_NP.get(tt.elem_type, np.float32)), dims))
        return specs


@dataclass(frozen=True)
class ImageOptions:
    """How to turn image files into a model input: resize, centre crop, normalize, layout."""

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0


class CalibrationSet:
    """Validated samples for a model, fed to it batch by batch.

    ``arrays`` maps every non-initializer model input to an array with samples on axis 0. Arrays may
    be memory-mapped: batches are sliced lazily and nothing is copied up front.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], specs: list[InputSpec], source: str):
        self.specs = specs
        self.source = source
        self.arrays = dict(arrays)
        self._validate()
        self.per_sample = {s.name: self.arrays[s.name].ndim == len(s.shape) + 1 for s in specs}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def _validate(self) -> None:
        names = {s.name for s in self.specs}
        missing = sorted(names - set(self.arrays))
        extra = sorted(set(self.arrays) - names)
        if missing or extra:
            raise InputError(
                f"calibration data from {self.source} does not match the model inputs: "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown {extra}" if extra else "")
                + f" (the model's inputs are {sorted(names)})")
        counts = {name: len(a) if a.ndim else 0 for name, a in self.arrays.items()}
        if any(c == 0 for c in counts.values()):
            raise InputError(f"calibration data from {self.source} is empty; give at least one sample")
        if len(set(counts.values())) > 1:
            raise InputError(f"calibration inputs have different sample counts {counts}; "
                             "every input needs the same number of samples on axis 0")
        for spec in self.specs:
            arr = self.arrays[spec.name]
            if arr.dtype != spec.dtype:
                raise InputError(f"calibration input {spec.name!r} has dtype {arr.dtype} but the model "
                                 f"expects {spec.dtype}; convert it (e.g. arr.astype(np.{spec.dtype}))")
            if arr.ndim == len(spec.shape) + 1:
                sample_shape, model_dims = arr.shape[1:], spec.shape
            elif arr.ndim == len(spec.shape):
                sample_shape, model_dims = arr.shape[1:], spec.shape[1:]
            else:
                raise InputError(f"calibration input {spec.name!r} has shape {arr.shape} but the model "
                                 f"expects {_fmt_shape(spec.shape)}; give samples on axis 0")
            bad = [i for i, (a, m) in enumerate(zip(sample_shape, model_dims)) if m is not None and a != m]
            if bad:
                raise InputError(f"calibration input {spec.name!r} has shape {arr.shape} but the model "
                                 f"expects {_fmt_shape(spec.shape)} (axis 0 = samples)")
            fixed = spec.shape[0] if spec.shape and arr.ndim == len(spec.shape) else None
            if fixed is not None and len(arr) % fixed:
                raise InputError(f"calibration input {spec.name!r} has {len(arr)} samples but the model's "
                                 f"batch axis is fixed at {fixed}; give a multiple of {fixed}")
            if np.issubdtype(arr.dtype, np.floating):
                finite = np.all([np.isfinite(arr[i:i + 256]).all() for i in range(0, len(arr), 256)])
                if not finite:
                    raise InputError(f"calibration input {spec.name!r} contains NaN or Inf; "
                                     "clean the data before calibrating")

    def split(self, holdout: int) -> tuple["CalibrationSet", "CalibrationSet | None"]:
        """The first len−holdout samples for calibration, the last ``holdout`` for verification."""
        n = len(self)
        if holdout <= 0 or holdout >= n:
            return self, None
        head = {k: v[: n - holdout] for k, v in self.arrays.items()}
        tail = {k: v[n - holdout:] for k, v in self.arrays.items()}
        return (CalibrationSet(head, self.specs, self.source),
                CalibrationSet(tail, self.specs, self.source + " (held back)"))

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts for the model, in sample order: single samples, the model's fixed batch, or
        ``batch_size`` samples where the batch axis is free."""
        fixed = [s.shape[0] for s in self.specs if s.shape and not self.per_sample[s.name]]
        if any(self.per_sample.values()):
            step = 1
        elif fixed and fixed[0] is not None:
            step = fixed[0]
        else:
            step = batch_size
        for start in range(0, len(self), step):
            yield {s.name: np.ascontiguousarray(self.arrays[s.name][start] if self.per_sample[s.name]
                                                else self.arrays[s.name][start:start + step])
                   for s in self.specs}


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read calibration file {path} as .npz ({exc}); "
                         "save it with numpy.savez(path, input_name=array)") from exc


def _load_npy_folder(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.npy"))
    names = {s.name for s in specs}
    try:
        if files and {f.stem for f in files} <= names:
            return {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
        if files and len(specs) == 1:
            samples = [np.load(f, allow_pickle=False) for f in files]
            return {specs[0].name: np.stack(samples)}
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read the .npy files in {path} ({exc})") from exc
    if not files:
        raise InputError(f"calibration folder {path} has no .npy or image files")
    raise InputError(f"calibration folder {path}: name the .npy files after the model inputs "
                     f"({', '.join(sorted(names))}), one array per input with samples on axis 0")


def _load_images(path: Path, files: list[Path], specs: list[InputSpec], opts: ImageOptions) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        raise InputError("image calibration folders need a model with exactly one input; "
                         "use an .npz file for models with several inputs")
    try:
        from PIL import Image
    except ImportError as exc:
        raise InputError("reading image folders needs Pillow: pip install pillow") from exc
    spec = specs[0]
    size = opts.size
    if size is None:
        dims = spec.shape[2:4] if opts.layout == "NCHW" else spec.shape[1:3]
        if len(dims) != 2 or None in dims:
            raise InputError(f"the model input {spec.name!r} has no fixed image size; give --image-size H,W")
        size = (int(dims[0]), int(dims[1]))
    out = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB")
        except OSError as exc:
            raise InputError(f"cannot read image {f}: {exc}") from exc
        short = opts.resize or min(size)
        w, h = img.size
        r = short / min(w, h)
        img = img.resize((max(size[1], round(w * r)), max(size[0], round(h * r))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size[1]) // 2, (h - size[0]) // 2
        img = img.crop((left, top, left + size[1], top + size[0]))
        x = np.asarray(img, dtype=np.float32) * np.float32(opts.scale)
        x = (x - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32)
        out.append(x.transpose(2, 0, 1) if opts.layout == "NCHW" else x)
    arr = np.stack(out).astype(spec.dtype)
    return {spec.name: arr}


def load_calibration(source: Any, model: onnx.ModelProto, image_options: ImageOptions | None = None) -> CalibrationSet:
    """Build a validated ``CalibrationSet`` for ``model`` from any supported source."""
    specs = InputSpec.from_model(model)
    if isinstance(source, CalibrationSet):
        return CalibrationSet(source.arrays, specs, source.source)
    if isinstance(source, Mapping):
        return CalibrationSet({k: np.asarray(v) for k, v in source.items()}, specs, "the given arrays")
    if hasattr(source, "get_next"):
        feeds = []
        while (feed := source.get_next()) is not None:
            feeds.append(feed)
        if not feeds:
            raise InputError("the calibration data reader returned no samples")
        arrays = {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in feeds[0]}
        return CalibrationSet(arrays, specs, "the calibration data reader")
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"unsupported calibration source {type(source).__name__}; give an .npz path, "
                         "a folder, a dict of arrays or a CalibrationDataReader")
    path = Path(source)
    if not path.exists():
        raise InputError(f"calibration data not found: {path}")
    if path.is_file():
        if path.suffix != ".npz":
            raise InputError(f"calibration file {path} is not .npz; give an .npz file or a folder")
        return CalibrationSet(_load_npz(path), specs, str(path))
    images = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if images:
        return CalibrationSet(_load_images(path, images, specs, image_options or ImageOptions()), specs, str(path))
    return CalibrationSet(_load_npy_folder(path, specs), specs, str(path))
