"""The onnxruntime-training worker: runs in the training environment (onnxruntime-training-cpu 1.19.2,
onnx < 1.17, numpy; never torch), started by ``engine`` as ``python worker.py KERNEL``, where KERNEL
is the path of ``kernels/adaquant.py`` (loaded by path: the onnxptq package and its dependencies are
not installed here). It reads one job per line on stdin (``protocol``) and answers one line per job.

Jobs are AdaQuant layers or whole loss graphs (``train_graph``: bias tuning). Per layer: the loss
graph of ``layer_graph``, its training artifacts (gradient graph and an AdamW optimizer, set to
PyTorch's Adam: bias-corrected m̂ and v̂, ε added to √v̂, no weight decay, the numpy engine's β₁, β₂),
then ``kernels.adaquant.fit`` with this engine's ``OrtTrainer`` in place of the numpy one: the
minibatch draws, the probe, the iterate kept and the final check are the numpy engine's code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import onnx

import protocol
from layer_graph import START, LayerOp, layer_model, theta_of


def _import_training() -> tuple:
    """onnxruntime.training's artifacts and api modules without its package ``__init__``, which
    imports torch (microsoft/onnxruntime#22070)."""
    spec = importlib.util.find_spec("onnxruntime.training")
    package = types.ModuleType("onnxruntime.training")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["onnxruntime.training"] = package
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    return artifacts, CheckpointState, Module, Optimizer


def _load_kernel(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("adaquant_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


ARTIFACTS, CHECKPOINT, MODULE, OPTIMIZER = _import_training()
import onnxruntime  # noqa: E402  (after the training package is in place)


def set_adam(path: Path, betas: tuple[float, float], epsilon: float) -> None:
    """Rewrite the generated AdamW node (Hugging Face mode: ε added to √v before bias correction) as
    PyTorch's Adam (adam_mode 0: ε added to √v̂) without weight decay."""
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "AdamWOptimizer")
    values = {"alpha": betas[0], "beta": betas[1], "epsilon": epsilon, "weight_decay": 0.0, "adam_mode": 0,
              "correct_bias": 1}
    del node.attribute[:]
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in values.items())
    onnx.save(model, path)


class OrtTrainer:
    """``kernels.adaquant.Trainer`` on onnxruntime-training: Module (loss and gradients of the layer
    graph) and Optimizer (Adam at learning rate 1 on the reparameterized groups, see ``layer_graph``)."""

    def __init__(self, kernel: types.ModuleType, problem, op: LayerOp, lr: dict[str, float], folder: Path):
        model, self.trained = layer_model(problem, op, lr)
        self.problem, self.op, self.lr = problem, op, lr
        frozen = [i.name for i in model.graph.initializer if i.name not in self.trained]
        ARTIFACTS.generate_artifacts(model, requires_grad=self.trained, frozen_params=frozen, loss=None,
                                     optimizer=ARTIFACTS.OptimType.AdamW, artifact_directory=folder)
        set_adam(folder / "optimizer_model.onnx", kernel.ADAM_BETAS, kernel.ADAM_EPSILON)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # as the numpy engine's one BLAS thread
        self.state = CHECKPOINT.load_checkpoint(folder / "checkpoint")
        self.module = MODULE(folder / "training_model.onnx", self.state, session_options=options)
        self.optimizer = OPTIMIZER(folder / "optimizer_model.onnx", self.module)
        self.optimizer.set_learning_rate(1.0)
        self.bounds = kernel.step_bounds(problem)

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.module.train()
        loss = float(self.module(self.op.rows_to_input(x), np.ascontiguousarray(y)))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self._clamp()
        return loss

    def _clamp(self) -> None:
        """The numpy engine's ``clamp`` on the relative steps ρ, in graph units p′ = (ρ − ρ⁰)/λ."""
        for name, (lo, hi) in self.bounds.items():
            if name not in self.trained:
                continue
            value = self.state.parameters[name].data
            rho = START[name] + self.lr[name] * value
            if np.any((rho < lo) | (rho > hi)):
                self.state.parameters[name] = ((np.clip(rho, lo, hi) - START[name]) / self.lr[name]).astype(value.dtype)

    def theta(self):
        return theta_of({name: self.state.parameters[name].data for name in self.trained}, self.problem, self.lr)


def train_graph(job: dict) -> str:
    """A graph job (bias tuning): Adam (PyTorch's, no weight decay) at ``lr`` on the named initializers
    of the loss graph for ``steps`` minibatches drawn at random (seeded) from all batches but the last
    ``holdout``, which judge: their loss (weighted by their samples; all batches' when ``holdout`` is
    0) before training and every ``check`` steps. Returns the values at the lowest judged loss (the
    start's if none is lower), with the judged and training losses there and at the start."""
    start = time.perf_counter()
    folder = job["folder"]
    model = onnx.load(job["model"])
    trainable = job["trainable"]
    frozen = [i.name for i in model.graph.initializer if i.name not in trainable]
    ARTIFACTS.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen, loss=None,
                                 optimizer=ARTIFACTS.OptimType.AdamW, artifact_directory=folder)
    set_adam(folder / "optimizer_model.onnx", (0.9, 0.999), 1e-8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    state = CHECKPOINT.load_checkpoint(folder / "checkpoint")
    module = MODULE(folder / "training_model.onnx", state, folder / "eval_model.onnx", session_options=options)
    optimizer = OPTIMIZER(folder / "optimizer_model.onnx", module)
    optimizer.set_learning_rate(job["lr"])
    batches, names, holdout = job["batches"], module.input_names(), job["holdout"]
    fitted = batches[:len(batches) - holdout]
    judged = batches[len(batches) - holdout:] if holdout else batches

    def loss(batch: dict[str, np.ndarray]) -> float:
        return float(module(*[batch[n] for n in names]))

    def overall(group: list[dict[str, np.ndarray]]) -> float:
        module.eval()
        samples = [len(next(iter(b.values()))) for b in group]
        value = float(np.dot([loss(b) for b in group], samples) / sum(samples))
        module.train()
        return value

    def snapshot(step: int, judged_loss: float) -> dict:
        """The state at ``step``; the fitted batches' loss is only measured for a kept iterate."""
        return {"step": step, "judged": judged_loss, "fitted": overall(fitted),
                "values": {name: np.array(state.parameters[name].data) for name in trainable}}

    first = best = snapshot(0, overall(judged))
    draws = np.random.default_rng(job["seed"]).integers(len(fitted), size=job["steps"])
    module.train()
    for step, i in enumerate(draws, 1):
        loss(fitted[i])
        optimizer.step()
        module.lazy_reset_grad()
        if step % job["check"] == 0 or step == len(draws):
            now = overall(judged)
            if now < best["judged"]:
                best = snapshot(step, now)
    info = {"before": first["judged"], "after": best["judged"], "fitted_before": first["fitted"],
            "fitted_after": best["fitted"], "step": best["step"], "seconds": time.perf_counter() - start}
    return protocol.write_trained(folder, best["values"], info)


def run(kernel: types.ModuleType, line: str) -> str:
    decoded = json.loads(line)
    if decoded.get("kind") == "graph":
        return train_graph(protocol.read_graph_job(decoded))
    job = protocol.read_job(line, kernel.LayerProblem, LayerOp, kernel.Settings)
    start = time.perf_counter()
    problem, folder = job["problem"], job["folder"]
    rows = protocol.row_reader(job["x_spec"], job["y_spec"])
    trainer = OrtTrainer(kernel, problem, job["op"], job["settings"].lr, folder)
    result = kernel.fit(problem, rows, job["y_spec"][1][0], job["settings"], job["seed"], trainer)
    return protocol.write_fit(folder, result, time.perf_counter() - start)


def main() -> None:
    kernel = _load_kernel(sys.argv[1])
    answers = os.fdopen(os.dup(1), "w")  # the protocol's channel; onnxruntime's own prints go to stderr
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            answer = run(kernel, line)
        except Exception as error:  # noqa: BLE001 — reported to the main process, which raises it
            answer = protocol.write_error(f"{type(error).__name__}: {error}")
        answers.write(answer + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
