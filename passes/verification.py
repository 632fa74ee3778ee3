"""Verification: the emitted model is checked, loaded and compared before anything is written.

* ``onnx.checker`` on the emitted model;
* onnxruntime sessions at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL (both must load and run);
* fusion coverage from the EXTENDED-optimized graph: of the nodes planned to run quantized, the
  fraction that onnxruntime runs on an integer kernel (matched by node name, which the fusions keep);
  the float leftovers are named. For the ``generic-qdq`` target (uint4 tensors, which onnxruntime's
  QDQ optimizers reject) the model is loaded and run at ORT_ENABLE_BASIC instead and coverage is
  not applicable (reported as None);
* integer simulation (``onnxptq/simulate.py``): on one held-back sample, up to ``SIMULATED`` each of
  the Conv layers, the Gemm/MatMul layers with integer inputs and the quantized Adds, spread over the model,
  are recomputed in numpy from the codes onnxruntime's fused graph feeds them, and their outputs
  compared with the fused kernels' (codes, or a float output's accumulator): differences other than
  one code at a rounding tie are counted as ``unexplained`` (int16 saturation, a merged Q/DQ pair, …);
* output agreement with the user's fp32 model on held-back calibration samples: SQNR, cosine,
  max |error| and, for class scores, top-1 agreement.
"""

from __future__ import annotations

import os
import tempfile

import onnx

from onnxptq import runtime
from onnxptq.costs import layer_encoding, layer_storage_bytes
from onnxptq.effects import agreement, verification_data
from onnxptq.simulate import check_layers
from onnxptq.state import CompileState
from onnxptq.target import resolve_target

SIMULATED = 8

INTEGER_KERNELS = {
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "MatMulIntegerToFloat", "MatMulNBits", "QLinearLeakyRelu",
    "QLinearSigmoid", "QLinearSoftmax", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
    "QLinearConvTranspose", "QLinearWhere", "QLinearReduceMean",
}


def optimized_kernels(model: onnx.ModelProto, threads: int = 1) -> dict[str, str]:
    """Node name → op type of ``model`` after onnxruntime's EXTENDED optimizations (what runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        runtime.session(model, threads=threads, level="extended", optimized_path=path)
        optimized = onnx.load(path)
    return {n.name: n.op_type for n in optimized.graph.node}


def fusion_coverage(planned: dict[str, str], kernels: dict[str, str]) -> dict:
    """Fraction of planned quantized nodes that run on integer kernels, and the float leftovers.

    A fused node keeps the planned node's name (MatMulNBits appends a suffix to it)."""
    kernel_of = {}
    for name in planned:
        op = kernels.get(name)
        if op is None:
            op = next((k for n, k in kernels.items() if n.startswith(name + "_")), "missing")
        kernel_of[name] = op
    leftovers = sorted(n for n, op in kernel_of.items() if op not in INTEGER_KERNELS)
    return {"planned": len(planned), "integer": len(planned) - len(leftovers),
            "coverage": round((len(planned) - len(leftovers)) / max(len(planned), 1), 6),
            "float_leftovers": [{"node": n, "op": planned[n], "runs_as": kernel_of[n]} for n in leftovers],
            "kernels": kernel_of}


def _spread(names: list[str], n: int = SIMULATED) -> list[str]:
    """Up to ``n`` of ``names``, evenly spaced from the first to the last."""
    n = min(n, len(names))
    return [names[round(k * (len(names) - 1) / max(n - 1, 1))] for k in range(n)]


class VerificationPass:
    name = "verification"

    def run(self, state: CompileState) -> None:
        out = state.output
        threads = state.options.threads
        onnx.checker.check_model(out, full_check=False)
        fused = resolve_target(state.options.target).fused
        if fused:
            kernels = optimized_kernels(out, threads=threads)
            runtime.session(out, threads=threads, level="all")
            cov = fusion_coverage(state.plan.ops, kernels)
        else:
            cov = {"coverage": None, "integer": None, "planned": len(state.plan.ops), "float_leftovers": [],
                   "kernels": {}}
        data = verification_data(state)
        state.report.verification = {
            "coverage": cov["coverage"], "integer_ops": cov["integer"], "planned_ops": cov["planned"],
            "float_leftovers": cov["float_leftovers"],
            "samples": len(data), "held_back": state.holdout is not None,
            "outputs": agreement(state, out),
        }
        convs = [n for n, layer in state.plan.layers.items() if layer.op_type == "Conv"]
        dense = [n for n, layer in state.plan.layers.items() if layer.op_type != "Conv" and layer.activation_input]
        adds = [n for n, op in state.plan.ops.items() if op == "Add"]
        if fused and (convs or dense or adds):
            one = {k: v[:1] for k, v in next(iter(data.batches(1))).items()}
            state.report.verification["integer_simulation"] = check_layers(
                out, _spread(convs) + _spread(dense) + _spread(adds), one)
        for name, layer in state.plan.layers.items():
            state.report.layers.append({"node": name, "op": layer.op_type, "w_bits": layer.grid.bits,
                                        "a_bits": state.plan.root(layer.input_name).bits
                                        if layer.activation_input else 32,
                                        "encoding": layer_encoding(layer, state.plan.goal),
                                        "bytes": layer_storage_bytes(layer, state.plan.goal),
                                        "kernel": cov["kernels"].get(name)})
        if state.holdout is None:
            state.report.warnings.append("agreement was measured on calibration samples (too few to hold "
                                         "any back); give more samples for an unbiased check")
