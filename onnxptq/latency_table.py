"""Per-layer latencies on this host, measured once per model and target and kept in a JSON file.

``--latency-ratio`` prices every layer's candidates in milliseconds (``costs.layer_latency``: the layer
alone, one thread, interleaved medians). Those numbers are noisy on a shared machine, so they are
measured once and written to ``--latency-table FILE``; a compile given the same file reads them back
instead of measuring, and the same file gives the same choice. The file records the model it was
measured on (SHA-256 of the source model's bytes) and the target; a file for another model or target
is refused rather than silently reused.

An encoding whose codes onnxruntime converts to int8 at load (``int4-cast``, ``int3-cast``,
``int2-cast``: the Cast or unpacking of a constant is folded) runs the very graph of ``int8``, so it
is timed as ``int8`` (``timed_as``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from onnxptq.costs import layer_latency
from onnxptq.errors import InputError
from onnxptq.model_io import write_atomic
from onnxptq.state import CompileState
from onnxptq.target import resolve_target

FOLDED_TO_INT8 = ("int4-cast", "int3-cast", "int2-cast")


def timed_as(encoding: str) -> str:
    """The encoding whose session is timed for ``encoding`` (module docstring)."""
    return "int8" if encoding in FOLDED_TO_INT8 else encoding


def layer_latencies(state: CompileState, wanted: dict[str, set[str]], path: str | None,
                    runs: int = 20) -> dict[str, dict[str, float]]:
    """Milliseconds per layer (node name) and encoding for every encoding in ``wanted[node]``: read
    from the table at ``path`` where it has them, measured (and added to the file) where not."""
    key = {"model": hashlib.sha256(state.source.SerializeToString()).hexdigest(),
           "target": resolve_target(state.options.target).name}
    table: dict = {**key, "layers": {}}
    if path is not None and Path(path).exists():
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--latency-table {path}: not a readable latency table ({exc})") from None
        if {k: table.get(k) for k in key} != key:
            raise InputError(f"--latency-table {path} was measured for another model or target; give a new path")
    layers = table.setdefault("layers", {})
    missing = {node: sorted({timed_as(e) for e in encodings} - set(layers.get(node, {})))
               for node, encodings in wanted.items()}
    missing = {node: encodings for node, encodings in missing.items() if encodings}
    for node in state.progress.track(list(missing), "latency per layer", len(missing)):
        measured = layer_latency(state, node, missing[node], runs)
        layers.setdefault(node, {}).update({e: round(ms, 6) for e, ms in measured.items()})
    if missing and path is not None:
        write_atomic((json.dumps(table, indent=1, sort_keys=True) + "\n").encode(), path)
    return {node: {e: float(layers[node][timed_as(e)]) for e in encodings} for node, encodings in wanted.items()}
