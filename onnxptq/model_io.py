"""Loading models defensively and writing outputs atomically.

The input model is only ever read. Outputs are written to a temporary file in the destination folder
and renamed into place, so an interrupted or failed compile never leaves a partial file behind and
never clobbers an existing output until the new one is complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxptq.errors import InputError


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and sanity-check an ONNX model file; every failure is an ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if not path.is_file():
        raise InputError(f"model path is not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                         "check the file is complete and really .onnx") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not model.graph.node:
        raise InputError(f"{path} is not a readable ONNX model (empty or truncated graph); "
                         "check the file is complete and really .onnx")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{path} fails the ONNX checker: {first}") from exc
    return model


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """The onnx-ir view of a model proto (a deep conversion: the proto is not shared)."""
    return ir.serde.deserialize_model(model)


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Fail early on an output path that would overwrite an input or cannot be written."""
    out = Path(out)
    for src in inputs:
        src = Path(src)
        if src.exists() and (out.resolve() == src.resolve() or (out.exists() and out.samefile(src))):
            raise InputError(f"output path {out} is the input {src}; choose another output path "
                             "(the input model is never overwritten)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable")
    if out.is_dir():
        raise InputError(f"output path {out} is a folder; give a file name such as model.q.onnx")
    return out


def write_atomic(data: bytes, out: str | os.PathLike) -> None:
    """Write ``data`` to ``out`` via a temporary file in the same folder and an atomic rename."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: onnx.ModelProto, out: str | os.PathLike) -> None:
    """Serialize ``model`` deterministically and write it atomically to ``out``."""
    if model.ByteSize() >= 2**31:
        raise InputError("the quantized model is larger than 2 GB, which onnxptq cannot write yet "
                         "(external data is not supported)")
    write_atomic(model.SerializeToString(deterministic=True), out)
