"""Which columns of a class head can lose bits: by calibration reach, or at random?

    python -m benchmarks.head_reach EXAMPLE [--bits 2] [--fractions 0.9,0.98,1.0]

Compiles the example at uniform W4A8 with int8 codes (``--target ort-cpu``, every layer at 4 bits, the
table's 64 calibration samples), then re-rounds a fraction of its class head's weight columns to
``--bits`` in place (per-column MSE scales; the rest of the model untouched) and measures each model
against fp32 on the eval set: top-1 agreement and mean KL, the columns taken either in ascending order
of reach — r_c, the largest probability the fp32 model gives class c on the calibration samples
(``passes/heads.py``) — or at random (seed 0). The evidence behind ``passes/heads.py``'s bands: one JSON
line per model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.paired import per_sample
from benchmarks.run import CALIB_SAMPLES

HEADED = ("ppocr_rec", "efficientnet_lite0")


class Scoring:
    """An example's fp32 model, the table's calibration samples and the eval inputs, and a build's
    distance to fp32 on the graph output the compiler compares (``float_outputs``), sample by sample
    (``benchmarks.paired.per_sample``: KL or 1 − cosine, and top-1 agreement)."""

    def __init__(self, example: str):
        from onnxptq.model_io import load_model, to_ir
        from onnxptq.passes.sensitivity import float_outputs

        ex = importlib.import_module(f"examples.{example}.example")
        self.fp32 = str(ex.fp32_model())
        self.calib = ex.calibration_set(CALIB_SAMPLES)
        self.inputs, _ = ex.eval_set()
        model = load_model(self.fp32)
        (output,), (self.normalized,) = float_outputs(to_ir(model))
        self.index = [o.name for o in model.graph.output].index(output)

    def reference(self, feeds: dict) -> np.ndarray:
        """The fp32 model's scored output on ``feeds``."""
        from examples.common import run_model

        return run_model(self.fp32, feeds)[self.index]

    def distance(self, model: onnx.ModelProto, path: Path, feeds: dict, ref: np.ndarray
                 ) -> tuple[float, float | None]:
        """(mean distance, mean top-1 agreement or None) of ``model`` (saved to ``path``) against ``ref``."""
        from examples.common import run_model

        onnx.save(model, path)
        d, agree = per_sample(ref, run_model(path, feeds)[self.index], self.normalized)
        return float(d.mean()), None if agree is None else float(agree.mean())


def fused(fp32: str, calib: dict):
    """The compile state of the fp32 model after fusion (the layers as the compiler plans them)."""
    from onnxptq.data import load_calibration
    from onnxptq.model_io import load_model, to_ir
    from onnxptq.passes.fusion import FusionPass
    from onnxptq.state import CompileOptions, CompileState

    model = load_model(fp32)
    state = CompileState(source=model, model=to_ir(model), options=CompileOptions(),
                         calib=load_calibration(calib, model, None), holdout=None)
    FusionPass().run(state)
    return state


def head_and_reach(fp32: str, calib: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """The fused fp32 model's class head: its node name, its float weight and each class's reach."""
    from onnxptq.graph import const
    from onnxptq.passes.heads import class_heads, reach

    state = fused(fp32, calib)
    (name, (output, normalized)), = class_heads(state.model).items()
    return name, const(state.model.graph.node(name).inputs[1]), reach(state, [output], [normalized])[0].r


def uniform_w4(fp32: str, calib: dict, path: Path) -> onnx.ModelProto:
    """Every layer at 4 bits with int8 codes (``--target ort-cpu``), written to ``path`` and loaded."""
    import onnxptq

    onnxptq.compile(fp32, calib, path, w_bits=4, target="ort-cpu", first_last_8bit=False)
    return onnx.load(path)


def rerounded(model: onnx.ModelProto, node: str, weight: np.ndarray, columns: np.ndarray, bits: int
              ) -> onnx.ModelProto:
    """``model`` with the int8 codes and scales of output channels ``columns`` of layer ``node`` re-rounded
    to ``bits``."""
    from onnxptq.kernels.quant import channel_rows, quantize, row_scales, symmetric_qmax

    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = {o: n for n in out.graph.node for o in n.output}
    head = next(n for n in out.graph.node if n.name == node)
    dq = producers[head.input[1]]
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    inits = {t.name: t for t in out.graph.initializer}
    codes, scale = (numpy_helper.to_array(inits[n]).copy() for n in dq.input[:2])
    qmax = symmetric_qmax(bits)
    rows = channel_rows(weight, axis)[columns]  # [columns, K]
    s = row_scales(rows, qmax, "mse").astype(scale.dtype)
    picked = np.moveaxis(codes, axis, 0)  # a view: [channels, …] (a Conv's kernel stays behind the axis)
    picked[columns] = quantize(rows, s[:, None], 0, -qmax, qmax).reshape(picked[columns].shape)
    scale[columns] = s
    for name, array in zip(dq.input[:2], (codes, scale)):
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=HEADED)
    parser.add_argument("--bits", type=int, default=2, choices=(2, 3))
    parser.add_argument("--fractions", default="0.9,0.98,1.0")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    scoring = Scoring(args.example)
    node, weight, r = head_and_reach(scoring.fp32, scoring.calib)
    ref = scoring.reference(scoring.inputs)
    with tempfile.TemporaryDirectory() as tmp:
        model = uniform_w4(scoring.fp32, scoring.calib, Path(tmp) / "w4.onnx")
        orders = {"reach": np.argsort(r, kind="stable"), "random": np.random.default_rng(0).permutation(len(r))}
        runs = [("none", 0.0, model)] + [(order, f, rerounded(model, node, weight, np.sort(columns[:round(f * len(r))]),
                                                             args.bits))
                                         for f in fractions for order, columns in orders.items()]
        for order, fraction, m in runs:
            kl, agree = scoring.distance(m, Path(tmp) / "m.onnx", scoring.inputs, ref)
            print(json.dumps({"example": args.example, "head": node, "classes": len(r), "bits": args.bits,
                              "order": order, "fraction": fraction, "top1_agreement": agree, "mean_kl": kl}))


if __name__ == "__main__":
    main()
