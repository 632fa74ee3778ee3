"""Agreement with fp32 on the held-back samples: of the final model (verification) and, with
``--pass-effects``, of the quantized model after every pass that changed it (the report's ``effects``).

The plan is complete (every weight and activation grid set) from the weights pass on; after it and
after each later pass up to emission, the model the plan stands for is emitted exactly as the
compile would write it (``output_model``), and measured as verification measures the output — same
samples, same onnxruntime optimization level, same metrics (``compare_outputs``) — so an entry is the
agreement the compile would have reached had the pipeline stopped there, and the last entry is the
verification's. A pass whose emitted model is byte-identical to the previous entry's (a weight solver
that was not asked for, mixed precision without a budget, a table pass on a model without tables) is
not listed.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import onnx

from onnxptq import runtime
from onnxptq.metrics import compare_outputs
from onnxptq.passes.emission import output_model
from onnxptq.state import CompileState
from onnxptq.target import resolve_target

FIRST = "weights"  # the first pass after which the plan can be emitted
LAST = "emission"  # effects are measured up to (not including) this pass


def verification_data(state: CompileState) -> Any:
    """The samples agreement is measured on: the held-back ones, else the calibration set."""
    return state.holdout if state.holdout is not None else state.calib


def agreement(state: CompileState, model: onnx.ModelProto) -> dict[str, dict[str, float]]:
    """Per-output agreement of the quantized ``model`` with the user's fp32 model on the verification
    samples, at the optimization level verification runs it (fused integer kernels, or plain QDQ for
    targets onnxruntime cannot fuse). The fp32 outputs are computed once per compile."""
    threads, batch = state.options.threads, state.options.batch_size
    feeds = list(verification_data(state).batches(batch))
    if state.reference is None:
        state.reference = runtime.run_all(runtime.session(state.source, threads=threads), feeds)
    level = "all" if resolve_target(state.options.target).fused else "basic"
    test = runtime.run_all(runtime.session(model, threads=threads, level=level), feeds)
    names = [o.name for o in state.source.graph.output]
    return compare_outputs(names, state.reference, test)


class PassEffects:
    """Called after every pass (``run_passes``'s ``after``): appends {after, outputs, seconds} to
    ``state.report.effects`` for each pass from ``FIRST`` up to ``LAST`` that changed the model."""

    def __init__(self) -> None:
        self.active = False
        self.digest: bytes | None = None

    def __call__(self, state: CompileState, name: str) -> None:
        self.active = (self.active or name == FIRST) and name != LAST
        if not self.active:
            return
        start = time.perf_counter()
        model = output_model(state)
        digest = hashlib.sha256(model.SerializeToString(deterministic=True)).digest()
        if digest == self.digest:
            return
        self.digest = digest
        outputs = agreement(state, model)
        state.report.effects.append({"after": name, "outputs": outputs,
                                     "seconds": round(time.perf_counter() - start, 3)})
