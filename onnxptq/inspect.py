"""``onnxptq inspect``: what a model holds and what onnxptq would quantize in it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from onnxptq.api import model_summary
from onnxptq.data import InputSpec
from onnxptq.model_io import load_model, to_ir
from onnxptq.passes.fusion import FusionPass
from onnxptq.passes.select import SelectPass
from onnxptq.state import CompileOptions, CompileState


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Inputs, outputs, op histogram, parameter count, and the layers the selection pass plans."""
    source = load_model(path)
    info = model_summary(source, str(path))
    info["inputs"] = [{"name": s.name, "dtype": str(s.dtype), "shape": ["?" if d is None else d for d in s.shape]}
                      for s in InputSpec.from_model(source)]
    info["outputs"] = [{"name": o.name, "dtype": "", "shape": [d.dim_value or d.dim_param or "?"
                                                              for d in o.type.tensor_type.shape.dim]}
                       for o in source.graph.output]
    state = CompileState(source=source, model=to_ir(source), options=CompileOptions(), calib=None, holdout=None)
    FusionPass().run(state)
    try:
        SelectPass().run(state)
    except Exception:  # no quantizable layers: still show the rest
        pass
    info["layers"] = [{"node": l.node, "op": l.op_type, "weight_shape": list(l.weight.shape),
                       "parameters": int(np.prod(l.weight.shape)), "bn": l.bn is not None}
                      for l in state.plan.layers.values()]
    return info
