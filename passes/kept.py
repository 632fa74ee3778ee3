"""A correction kept only where it brings the model's outputs nearer fp32.

BN re-estimation and bias correction each match statistics of every layer's own output to fp32's
(per-channel spread and mean, or mean alone). Neither looks at the model's outputs, and matching them
can move those away from fp32: where a 4-bit layer's int32 bias step s_x·s_w is coarse, a corrected
bias lands a half-step from where it was meant to and the mean error is not removed but moved. Under
goal size at uniform 4 bits (the distance D below, on the calibration set; the report notes it):
PP-OCRv4 with BitSplit weights, bias correction 0.155 → 0.264 (eval-set fp32 agreement 0.884 with it,
0.925 without); magika, BN re-estimation 0.0102 → 0.0113.

So each measures D, the distance of the outputs of the model the plan stands for (emitted as the
compile writes it, run as the corrections measure it: ``layer_moments.integer_level``) to fp32's —
mean KL for class scores, else 1 − cosine, the distance mixed precision ranks its candidates by
(``sensitivity.output_distance``) — on the calibration set before and after it, and where D did not
fall puts the layers it changed back as they were (a zero bias it gave a layer stays: the graph has
it), noting both values. The calibration set, not the held-back samples: a correction fits two
numbers per channel on thousands of outputs per channel, and D is not what it fits; the held-back
samples stay unseen for verification, and mixed precision's measured contenders, corrected by the
same passes on the same samples, see the same decisions. ``keep=always`` skips the check (two runs
of the model fewer).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator

from onnxptq import runtime
from onnxptq.errors import InputError
from onnxptq.passes.emission import output_model
from onnxptq.passes.layer_moments import integer_level
from onnxptq.passes.sensitivity import Reference, output_distance, reference, run_batches
from onnxptq.state import CompileState

KEEP = ("nearer", "always")
NOT_KEPT = "not kept"  # how the note of a correction put back starts (the summary lists those)


def check_keep(pass_name: str, keep: str) -> None:
    """The one-line error for a bad ``keep`` option of ``pass_name``."""
    if keep not in KEEP:
        raise InputError(f"{pass_name}: keep must be one of {', '.join(KEEP)}; got {keep!r}")


def calibration_reference(state: CompileState) -> Reference:
    """The fp32 model's outputs on the calibration set, computed once per compile."""
    if state.calib_reference is None:
        state.calib_reference = reference(state.model, state.plan, state.calib, state.options.threads)
    return state.calib_reference


def plan_distance(state: CompileState) -> float:
    """D of the model ``state.plan`` stands for, on the calibration set (module doc). Run once per
    emitted model: a correction's ``before`` is the previous one's ``after``, and mixed precision
    measures a contender as its last correction left it."""
    model = output_model(state).SerializeToString(deterministic=True)
    digest = hashlib.sha256(model).digest()
    if digest not in state.calib_distances:
        ref = calibration_reference(state)
        session = runtime.session(model, state.options.threads, integer_level(state))
        state.calib_distances[digest] = output_distance(ref.outputs, run_batches(session, ref.names, ref.feeds),
                                                        ref.normalized)
    return state.calib_distances[digest]


@contextlib.contextmanager
def kept_if_nearer(state: CompileState, pass_name: str, layers: list[str], keep: str) -> Iterator[None]:
    """Around a correction of ``layers``: afterwards, unless ``keep`` is ``always``, the layers are
    put back as they were if D did not fall (module doc)."""
    if keep == "always":
        yield
        return
    before, saved = plan_distance(state), {name: copy.deepcopy(state.plan.layers[name]) for name in layers}
    yield
    after = plan_distance(state)
    if after < before:
        state.report.note(pass_name, f"kept: distance to fp32 on the calibration set {before:.4g} → {after:.4g}")
        return
    for name, layer in saved.items():  # in place: whoever holds a layer sees it restored
        vars(state.plan.layers[name]).update(vars(layer))
    state.report.note(pass_name, f"{NOT_KEPT}: it moved the outputs away from fp32 on the calibration set "
                                 f"(distance {before:.4g} → {after:.4g}); the layers are as before it")
