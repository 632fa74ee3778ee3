"""Per-step time of AdaQuant's two engines (numpy, onnxruntime-training) on one real layer.

    python -m benchmarks.engine_speed --example efficientnet_lite0 [--layer NODE] [--steps 200]

Plans the example at W4A8 from ``--samples`` calibration samples, captures the layer's fp32 rows as
the pass does (``passes/adaquant.py``, at most 1024 per batch), builds its problem (``layer_problem``)
and fits it with each engine for 0 and ``--steps`` iterations (one probe check, at the end); the
difference over the steps is the time of one Adam step on a minibatch, setup excluded (the training
engine's artifacts and sessions, and its worker's start). Default layer: the middle 1×1 Conv.
Needs the training environment (``make .venv-training/.installed``).
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

import onnxptq
from onnxptq.capture import capture, layer_io
from onnxptq.kernels.adaquant import Settings
from onnxptq.passes.adaquant import LayerRows, fit_files, layer_problem
from onnxptq.passes.bias_correction import give_bias
from onnxptq.training import engine
from onnxptq.training.layer_graph import LayerOp
from onnxptq.training.protocol import open_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", default="efficientnet_lite0")
    parser.add_argument("--layer", default=None, help="node name (default: the middle 1×1 Conv)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    ex = importlib.import_module(f"examples.{args.example}.example")
    state = onnxptq.planned_state(ex.fp32_model(), ex.calibration_set(args.samples), w_bits=4)
    nodes = {n.name: n for n in state.model.graph}
    if args.layer is None:
        pointwise = [name for name, layer in state.plan.layers.items()
                     if layer.op_type == "Conv" and layer.weight.shape[2:] == (1, 1)]
        args.layer = pointwise[len(pointwise) // 2]
    layer = state.plan.layers[args.layer]
    give_bias(state, layer)
    io = layer_io(nodes[layer.node], layer)
    with tempfile.TemporaryDirectory() as tmp:
        rows = capture(state, [layer], lambda i: LayerRows(Path(tmp) / "rows", i, True, True), 1024)[layer.node]
        x_spec, y_spec = rows.x.close(), rows.y.close()
        problem = layer_problem(state, layer, io, open_rows(y_spec))
        op = LayerOp(layer.op_type, io.kernel)
        times, losses = {}, {}
        with engine.TrainingWorker(engine.training_python()) as worker:
            for steps in (0, args.steps):
                settings = Settings(iterations=steps, check=max(steps, 1))
                for name, run in (("numpy", lambda: fit_files(problem, x_spec, y_spec, settings, 0)),
                                  ("ort-training", lambda: worker.fit(problem, op, x_spec, y_spec, settings, 0))):
                    result, seconds = run()
                    times[name, steps], losses[name] = seconds, (result.loss_rtn, result.loss)
    batch = int(min(max(Settings.elements // (io.groups * io.k), 16), Settings.batch))
    print(f"{args.example} {layer.node}: {layer.op_type} {tuple(layer.weight.shape)}, groups {io.groups}, "
          f"{y_spec[1][0]} rows, minibatch {batch}, {args.steps} steps, 1 thread")
    for name in ("numpy", "ort-training"):
        per_step = (times[name, args.steps] - times[name, 0]) / args.steps
        rtn, loss = losses[name]
        print(f"  {name:13s} {1000 * per_step:7.2f} ms/step  (setup and final check {times[name, 0]:.2f} s; "
              f"loss {loss:.6g} vs round-to-nearest {rtn:.6g})")


if __name__ == "__main__":
    main()
