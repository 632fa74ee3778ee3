"""Calibration: run the fused fp32 model on onnxruntime and pick a range for every quantized tensor.

The model is run with the planned tensors as extra outputs, batch by batch; only a running min/max
(and, for percentile / MSE / entropy, a 2048-bin histogram from a second pass) is kept per tensor,
so memory is bounded by one batch's activations whatever the number of samples. Tensors tied to
another (data-movement ops) share its range; constants are ranged from their values.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxptq import runtime
from onnxptq.errors import InputError
from onnxptq.kernels.ranges import METHODS, Histogram, RangeStat, needs_histogram, select_range
from onnxptq.state import CompileState


def with_outputs(model: ir.Model, names: list[str]) -> onnx.ModelProto:
    """A proto of ``model`` whose graph also outputs the tensors ``names`` (float32)."""
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto


def range_statistics(state: CompileState, names: list[str]) -> dict[str, tuple[RangeStat, Histogram | None]]:
    """Per named tensor its running min/max and, for the methods that need one, its histogram, over
    the fused fp32 model's values on the calibration set (module doc)."""
    opts = state.options
    sess = runtime.session(with_outputs(state.model, names), threads=opts.threads, level="basic")
    stats = {name: RangeStat() for name in names}
    n_batches = -(-len(state.calib) // opts.batch_size)

    def passes_over(description: str):
        for feed in state.progress.track(state.calib.batches(opts.batch_size), description, n_batches):
            yield dict(zip(names, sess.run(names, feed)))

    for outs in passes_over("calibration: ranges"):
        for name, x in outs.items():
            if not np.isfinite(x).all():
                raise InputError(f"the fp32 model produces NaN/Inf in tensor {name!r} on the calibration "
                                 "data; check the inputs are preprocessed as the model expects")
            stats[name].update(x)
    hists = None
    if needs_histogram(opts.calib_method):
        hists = {name: Histogram(s.lo, s.hi) for name, s in stats.items()}
        for outs in passes_over("calibration: histograms"):
            for name, x in outs.items():
                hists[name].update(x)
    return {name: (stats[name], hists and hists[name]) for name in names}


def calibrated_range(state: CompileState, name: str, bits: int) -> tuple[float, float]:
    """The range of calibrated tensor ``name`` for a grid of ``bits`` bits, by ``--calib-method``, from
    the statistics the calibration pass kept (``CompileState.range_statistics``): mixed precision asks
    again at 4 bits for its 4-bit input candidates."""
    stat, hist = state.range_statistics[name]
    return select_range(state.options.calib_method, stat, hist, bits, state.options.percentile)


class CalibrationPass:
    name = "calibration"

    def run(self, state: CompileState) -> None:
        opts = state.options
        if opts.calib_method not in METHODS:
            raise InputError(f"unknown --calib-method {opts.calib_method!r}; choose one of {', '.join(METHODS)}")
        plan = state.plan
        graph = state.model.graph
        roots = [a.name for a in plan.activations.values() if a.tied_to is None and not a.constant]
        for act in plan.activations.values():
            if act.constant:
                values = graph.initializers[act.name].const_value.numpy()
                act.lo, act.hi = float(values.min()), float(values.max())
        state.range_statistics = range_statistics(state, roots)
        for name in roots:
            act = plan.activations[name]
            act.lo, act.hi = calibrated_range(state, name, act.bits)
        state.report.note(self.name, f"{len(roots)} tensors over {len(state.calib)} samples, "
                                     f"method {opts.calib_method}")
