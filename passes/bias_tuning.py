"""Bias tuning (the advanced pipeline's last correction): all biases fitted jointly to the fp32 outputs.

Bias correction matches each layer's mean output to fp32's one layer at a time. Bias tuning then moves
every bias b together to bring the model's *outputs* to fp32's on the calibration set:

    min_u  L(b⁰ + σ ⊙ u),  L = Σ over the float outputs of: KL(p_fp32 ‖ p_q) over the last axis (class
                              scores), else 1 − cos(y_fp32, y_q) per sample; averaged over samples
                              and positions (the distance mixed precision measures)

The quantized model q is the plan as emission writes it, in float: each weight at ŵ = q·s, each lookup
table at T̂, each planned activation through com.microsoft FakeQuant on its grid (the codes emission
writes; straight-through gradient inside the grid, zero outside). b⁰ is the bias after bias
correction, which this pass runs first, and σ_c the fp32 standard deviation of the layer's output
channel c (floored at 1e-3 of the layer's mean), so one learning rate moves each bias by a like
fraction of its channel's spread: Adam at ``lr`` for ``steps`` minibatches of ``batch`` calibration
samples (drawn with the compile's seed). CalibTIP's code trained conv biases on the same KL with SGD
(lr 0.1, 600 steps of 50 images).

A calibration set of a few images is fitted far too well: on EfficientNet-Lite0 W4A8 (64 crops of 3
photos) 200 steps at lr 10⁻³ judged on the batches they train on lowered the calibration KL from
0.123 to 0.027 while the eval set's rose from 0.384 to 0.422. So the last ``holdout`` of the batches is never
trained on and judges: the loss there is measured every ``check`` steps, and the biases at its lowest
are kept — those of bias correction unless training lowers it by at least ``margin`` (15%). (The
example's calibration crops are ordered by photo, so its held-out batches are a photo the training
never saw.) One photo is a small judge: on EfficientNet-Lite0 W4A4 (advanced) its KL fell 9%, 0.127 →
0.115, while the eval photos' rose (fp32 agreement 0.462 against bias correction's 0.519); where
tuning helped the eval set the held-out loss fell by 23–44% (PP-OCRv4 W4A8 light and advanced, and
its 0.16× mix: CER 0.030 → 0.029, 0.062 → 0.022).

The gradients come from onnxruntime-training (``make .venv-training/.installed``; ``onnxptq/training``).
Without it, or on a graph its gradient builder cannot differentiate, the report says so and the biases
stay as bias correction left them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from onnxptq import runtime
from onnxptq.errors import InputError
from onnxptq.graph import add_initializer, attr
from onnxptq.kernels.quant import fake_quantize
from onnxptq.metrics import log_probabilities
from onnxptq.passes.bias_correction import BiasCorrectionPass
from onnxptq.passes.emission import int32_bias
from onnxptq.passes.layer_moments import fp32_moments
from onnxptq.passes.sensitivity import float_outputs
from onnxptq.plan import LayerPlan, QuantPlan
from onnxptq.state import CompileState
from onnxptq.training import engine

TRAINING_IR = 10  # the newest IR version onnxruntime-training 1.19 loads
TRAINING_OPSET = 21  # and opset
TARGET = "{}.target"  # graph input holding the fp32 reference of output {}


def _reduce_sum(graph: ir.Graph, opset: int, x: ir.Value, axis: int) -> ir.Value:
    """ReduceSum of ``x`` over ``axis`` (dropped), in the form the model's opset takes (axes as an input
    from opset 13)."""
    if opset >= 13:
        node = ir.node("ReduceSum", [x, add_initializer(graph, "tuning.axis", np.array([axis], np.int64))],
                       {"keepdims": 0})
    else:
        node = ir.node("ReduceSum", [x], {"axes": [axis], "keepdims": 0})
    graph.append(node)
    return node.outputs[0]


def _op(graph: ir.Graph, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
    node = ir.node(op_type, list(inputs), attributes or None)
    graph.append(node)
    return node.outputs[0]


def _output_loss(graph: ir.Graph, opset: int, y: ir.Value, logits: ir.Value | None, target: ir.Value) -> ir.Value:
    """The loss term of one output: KL(target ‖ softmax(logits)) over the last axis (the target floored
    at 1e-12 inside its log, as ``metrics.mean_kl``), averaged over positions, or (``logits`` None)
    1 − cos per sample, averaged."""
    if logits is not None:
        log_q = _op(graph, "LogSoftmax", logits, axis=-1)
        log_p = _op(graph, "Log", _op(graph, "Max", target, add_initializer(graph, "tuning.tiny",
                                                                            np.array(1e-12, np.float32))))
        kl = _reduce_sum(graph, opset, _op(graph, "Mul", target, _op(graph, "Sub", log_p, log_q)), -1)
        return _op(graph, "ReduceMean", kl, keepdims=0)
    flat_y, flat_t = _op(graph, "Flatten", y, axis=1), _op(graph, "Flatten", target, axis=1)
    dot = _reduce_sum(graph, opset, _op(graph, "Mul", flat_y, flat_t), 1)
    norms = [_op(graph, "Sqrt", _reduce_sum(graph, opset, _op(graph, "Mul", v, v), 1)) for v in (flat_y, flat_t)]
    floor = add_initializer(graph, "tuning.floor", np.array(1e-12, np.float32))
    cos = _op(graph, "Div", dot, _op(graph, "Max", _op(graph, "Mul", *norms), floor))
    return _op(graph, "Sub", add_initializer(graph, "tuning.one", np.array(1.0, np.float32)),
               _op(graph, "ReduceMean", cos, keepdims=0))


def _fake_quantize_activations(graph: ir.Graph, plan: QuantPlan) -> None:
    """Route every planned activation through FakeQuant on its grid (constants: their fake-quantized
    values), for the consumers emission quantizes it for (a layer with a float input reads it as is)."""
    float_input = {name for name, layer in plan.layers.items() if not layer.activation_input}
    values = {v.name: v for n in graph for v in n.outputs} | {v.name: v for v in graph.inputs}
    first = next(iter(graph))
    for name, act in plan.activations.items():
        scale, zero_point = plan.act_params(name)
        qmax = plan.root(name).qmax
        if act.constant:
            init = graph.initializers[name]
            fq = add_initializer(graph, f"{name}.tuning", fake_quantize(init.const_value.numpy(), scale, zero_point,
                                                                        0, qmax).astype(np.float32))
            for use in list(init.uses()):
                if use.node.name in plan.ops:
                    use.node.replace_input_with(use.idx, fq)
            continue
        value = values[name]
        s = add_initializer(graph, f"{name}.tuning.scale", np.array(scale, np.float32))
        z = add_initializer(graph, f"{name}.tuning.zero_point", np.array(zero_point, np.float32))
        node = ir.node("FakeQuant", [value, s, z], {"quant_min": 0, "quant_max": qmax}, domain="com.microsoft",
                       num_outputs=2, name=f"{name}.tuning.FakeQuant")
        out = node.outputs[0]
        out.name, out.type, out.shape = f"{name}.tuning", value.type, value.shape
        for use in list(value.uses()):
            if use.node is not node and use.node.name not in float_input:
                use.node.replace_input_with(use.idx, out)
        if value.is_graph_output():
            graph.outputs[next(i for i, v in enumerate(graph.outputs) if v is value)] = out
        if value.producer() is None:
            graph.insert_before(first, node)
        else:
            graph.insert_after(value.producer(), node)


def _rounded(graph: ir.Graph, b: ir.Value, step: np.ndarray) -> ir.Value:
    """step·rint(b/step) with the straight-through gradient: r + sg(rint(r) − r), r = b/step, where
    sg(δ) = Cast(Cast(δ·2⁴⁰, int64), float)·2⁻⁴⁰ (a Cast to an integer type stops gradients, and
    |δ| ≤ ½ keeps δ·2⁴⁰ exact in int64): the bias emission's int32 codes give, the gradient of b."""
    s = add_initializer(graph, "tuning.step", step.astype(np.float32))
    up, down = (add_initializer(graph, "tuning.pow", np.array(v, np.float32)) for v in (2.0**40, 2.0**-40))
    r = _op(graph, "Div", b, s)
    delta = _op(graph, "Sub", _op(graph, "Round", r), r)
    scaled = _op(graph, "Cast", _op(graph, "Mul", delta, up), to=ir.DataType.INT64)
    offset = _op(graph, "Mul", _op(graph, "Cast", scaled, to=ir.DataType.FLOAT), down)
    return _op(graph, "Mul", _op(graph, "Add", r, offset), s)


def _hard_sigmoid(graph: ir.Graph, x: ir.Value, alpha: float, beta: float) -> list[ir.Node]:
    """clip(α·x + β, 0, 1) in Mul, Add and Clip (opset ≥ 11)."""
    const = lambda v: add_initializer(graph, "tuning.hard", np.array(v, np.float32))  # noqa: E731
    scaled = ir.node("Mul", [x, const(alpha)])
    shifted = ir.node("Add", [scaled.outputs[0], const(beta)])
    return [scaled, shifted, ir.node("Clip", [shifted.outputs[0], const(0.0), const(1.0)])]


def _differentiable(graph: ir.Graph, opset: int) -> None:
    """Ops onnxruntime-training has no gradient for, rewritten into ops it has, same values:
    GlobalMaxPool as the MaxPool over the whole (static) spatial extent, ReduceMax over one axis as
    TopK(k = 1) (squeezed unless keepdims), HardSigmoid as clip(α·x + β, 0, 1) and HardSwish as
    x·clip(x/6 + ½, 0, 1)."""
    for node in list(graph):
        x = node.inputs[0] if node.inputs else None
        if node.op_type in ("HardSigmoid", "HardSwish") and opset >= 11:
            new = _hard_sigmoid(graph, x, attr(node, "alpha", 0.2), attr(node, "beta", 0.5)) \
                if node.op_type == "HardSigmoid" else _hard_sigmoid(graph, x, 1 / 6, 0.5)
            if node.op_type == "HardSwish":
                new.append(ir.node("Mul", [x, new[-1].outputs[0]]))
        elif node.op_type == "GlobalMaxPool" and x.shape and all(isinstance(d, int) for d in x.shape.dims[2:]):
            new = [ir.node("MaxPool", [x], {"kernel_shape": list(x.shape.dims[2:])})]
        elif node.op_type == "ReduceMax" and opset < 18 and len(axes := list(attr(node, "axes", []))) == 1:
            k = add_initializer(graph, "tuning.k", np.array([1], np.int64))
            new = [ir.node("TopK", [x, k], {"axis": axes[0]}, num_outputs=2)]
            if not attr(node, "keepdims", 1):
                squeeze = add_initializer(graph, "tuning.axes", np.array(axes, np.int64))
                new.append(ir.node("Squeeze", [new[0].outputs[0], squeeze] if opset >= 13 else [new[0].outputs[0]],
                                   None if opset >= 13 else {"axes": axes}))
        else:
            continue
        out, old = new[-1].outputs[0], node.outputs[0]
        out.type, out.shape, out.name, old.name = old.type, old.shape, old.name, f"{old.name}.replaced"
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.insert_after(node, new)
        graph.remove(node, safe=True)


def _int32_bias(layer: LayerPlan, plan: QuantPlan) -> tuple[np.ndarray, np.ndarray] | None:
    """``emission.int32_bias`` (codes, step) where emission writes the bias as int32, None where it
    stays float (a layer with a float input: int4 MatMulNBits)."""
    return int32_bias(layer, plan) if layer.activation_input and not layer.grid.block_size else None


def _emitted_bias(layer: LayerPlan, plan: QuantPlan) -> np.ndarray:
    """The bias values the emitted layer adds: its int32 codes times their step, or its float bias."""
    coded = _int32_bias(layer, plan)
    if coded is None:
        return layer.bias.astype(np.float32)
    codes, step = coded
    return (codes * step.astype(np.float64)).astype(np.float32)


def loss_graph(state: CompileState, spread: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]] | None = None
               ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The training graph of the plan (module doc) whose one output is the loss, its inputs the
    model's and one ``TARGET`` per float output; and layer → the name of its trainable u (zeros), for
    the layers in ``spread`` (layer → σ per channel). With ``shapes`` (input → the shape every batch
    gives it) the graph is specialized to them (``_static``)."""
    model = ir.serde.deserialize_model(ir.serde.serialize_model(state.model))
    graph, plan = model.graph, state.plan
    nodes = {n.name: n for n in graph}
    softmax = {v.name: v.producer().name for v in state.model.graph.outputs
               if v.producer() is not None and v.producer().op_type == "Softmax"}
    trainable = {}
    for name, layer in plan.layers.items():
        node = nodes[name]
        node.replace_input_with(1, add_initializer(graph, f"{name}.tuning.weight", layer.dequantized()))
        if layer.bias is None:
            continue
        if name not in spread:  # the plan's (corrected) bias as the kernel adds it, not the graph's fp32 one
            node.replace_input_with(2, add_initializer(graph, f"{name}.tuning.bias", _emitted_bias(layer, plan)))
            continue
        u = add_initializer(graph, f"{name}.tuning.u", np.zeros(layer.channels, np.float32))
        trainable[name] = u.name
        sigma = add_initializer(graph, f"{name}.tuning.sigma", spread[name].astype(np.float32))
        b0 = add_initializer(graph, f"{name}.tuning.bias", layer.bias.astype(np.float32))
        bias = _op(graph, "Add", b0, _op(graph, "Mul", sigma, u))
        coded = _int32_bias(layer, plan)
        if coded is not None:
            bias = _rounded(graph, bias, coded[1])
        node.replace_input_with(2, bias)
    for name, table in plan.tables.items():
        nodes[name].replace_input_with(0, add_initializer(graph, f"{name}.tuning.table", table.dequantized()))
    _fake_quantize_activations(graph, plan)
    opset = model.opset_imports.get("", 1)
    _differentiable(graph, opset)
    names, normalized = float_outputs(state.model)
    terms = []
    for output, name, kind in zip([v for v in graph.outputs if v.dtype == ir.DataType.FLOAT], names, normalized):
        target = ir.Value(name=TARGET.format(name), type=ir.TensorType(ir.DataType.FLOAT), shape=output.shape)
        graph.inputs.append(target)
        # probabilities: the Softmax's input (its fake-quantized logits, as emitted) under LogSoftmax
        logits = None if kind is None else nodes[softmax[name]].inputs[0] if kind else output
        terms.append(_output_loss(graph, opset, output, logits, target))
    loss = terms[0]
    for term in terms[1:]:
        loss = _op(graph, "Add", loss, term)
    loss.name, loss.type, loss.shape = "loss", ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
    graph.outputs.clear()
    graph.outputs.append(loss)
    model.opset_imports["com.microsoft"] = 1
    if shapes:
        _static(model, shapes, [graph.initializers[u] for u in trainable.values()])
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
    proto = ir.serde.serialize_model(model)
    proto.ir_version = min(proto.ir_version, TRAINING_IR)
    del proto.graph.value_info[:]  # partial entries (the new values carry no type); the builder infers them
    return proto, trainable


def _logit_values(model: ir.Model) -> list[ir.Value]:
    """The values KL reads as logits: a class-score output computed by a Gemm/MatMul, or the input of
    the Softmax computing one."""
    names, normalized = float_outputs(model)
    outputs = {v.name: v for v in model.graph.outputs}
    found = []
    for name, kind in zip(names, normalized):
        if kind is not None:
            value = outputs[name].producer().inputs[0] if kind else outputs[name]
            if value.producer() is not None:
                found.append(value)
    return found


def _static(model: ir.Model, shapes: dict[str, tuple[int, ...]], trained: list[ir.Value]) -> None:
    """Give every graph input its one shape and fold constants, so that shape arithmetic (Shape →
    Gather → Concat → Reshape) becomes constant: onnxruntime-training 1.19's gradient graph mis-handles
    it in the dynamic form (PP-OCR: "Can broadcast 0 by 0 or 1. 8 is invalid" at batch 8, SIGFPE at
    batch 1). The ``trained`` initializers are graph inputs meanwhile, so they are not folded away."""
    for value in model.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    model.graph.inputs.extend(trained)
    onnxscript.optimizer.fold_constants(model)
    for value in trained:
        model.graph.inputs.remove(value)


def training_batches(state: CompileState, batch: int) -> list[dict[str, np.ndarray]]:
    """The calibration set in feeds of ``batch`` samples (where the batch axis is free), each with the
    fp32 model's float outputs as ``TARGET`` inputs: probabilities for class scores, else as given."""
    names, normalized = float_outputs(state.model)
    session = runtime.session(ir.serde.serialize_model(state.model), threads=state.options.threads, level="basic")
    batches = []
    for feed in state.calib.batches(batch):
        outputs = session.run(names, feed)
        targets = {TARGET.format(n): y if kind is None else np.exp(log_probabilities(y, kind)).astype(np.float32)
                   for n, y, kind in zip(names, outputs, normalized)}
        batches.append({**feed, **targets})
    return batches


def _shapes(batch: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: array.shape for name, array in batch.items()}


@dataclass
class BiasTuningPass:
    """``bias-tuning[:steps=N][:lr=F][:batch=N][:holdout=F][:check=N][:margin=F]``: bias correction,
    then the biases trained on the model's output loss (module doc)."""

    steps: int = 200
    lr: float = 0.001
    batch: int = 8
    holdout: float = 0.25
    check: int = 20
    margin: float = 0.15
    name: ClassVar[str] = "bias-tuning"

    def __post_init__(self) -> None:
        if self.steps < 0 or min(self.batch, self.check) < 1 or not self.lr > 0:
            raise InputError(f"bias-tuning: steps must be ≥ 0, batch and check ≥ 1, lr > 0; got steps={self.steps}, "
                             f"batch={self.batch}, check={self.check}, lr={self.lr}")
        if not 0 <= self.holdout < 1:
            raise InputError(f"bias-tuning: holdout is a fraction of the batches in [0, 1); got {self.holdout}")
        if not 0 <= self.margin < 1:
            raise InputError(f"bias-tuning: margin is a fraction of the held-out loss in [0, 1); got {self.margin}")

    def run(self, state: CompileState) -> None:
        BiasCorrectionPass().run(state)
        layers = [name for name, layer in state.plan.layers.items() if layer.bias is not None]
        python = engine.find_training_python()
        reason = ("no layer has a bias" if not layers else
                  "onnxruntime-training is not installed (make .venv-training/.installed)" if python is None else
                  f"the model's opset is above {TRAINING_OPSET}"
                  if state.model.opset_imports.get("", 1) > TRAINING_OPSET else None)
        if reason:
            state.report.note(self.name, f"{reason}: biases as bias correction left them, not tuned")
            return
        # The layers that compute logits: KL cannot see a shift common to all classes, so their biases
        # would drift freely along it (CalibTIP froze its fc layer too)
        logits = {v.producer().name for v in _logit_values(state.model)}
        layers = [name for name in layers if name not in logits]
        moments = fp32_moments(state, layers)
        spread = {}
        for name in layers:
            sigma = np.sqrt(moments[name].var)
            spread[name] = np.maximum(sigma, 1e-3 * max(float(sigma.mean()), 1e-12))
        batches = training_batches(state, self.batch)
        # a last, smaller batch is left out, so that every input has one shape to specialize the graph to
        batches = [b for b in batches if _shapes(b) == _shapes(batches[0])]
        proto, trainable = loss_graph(state, spread, _shapes(batches[0]))
        holdout = min(round(len(batches) * self.holdout), len(batches) - 1)
        with engine.TrainingWorker(python) as worker:
            try:
                trained, info = worker.train_graph(proto.SerializeToString(), batches, list(trainable.values()),
                                                   steps=self.steps, lr=self.lr, holdout=holdout, check=self.check,
                                                   seed=state.options.seed)
            except RuntimeError as exc:
                why = str(exc).strip()[-160:]
                state.report.note(self.name, f"onnxruntime-training could not train the graph (…{why}): "
                                             "biases as bias correction left them, not tuned")
                return
        kept = info["step"] > 0 and info["after"] <= (1 - self.margin) * info["before"]
        if kept:
            for name, u in trainable.items():
                layer = state.plan.layers[name]
                layer.bias = (layer.bias + spread[name] * trained[u]).astype(np.float32)
        judged = f"on {holdout} held-out batches" if holdout else "on the calibration set"
        state.report.note(self.name, f"{len(trainable)} biases, {self.steps} Adam steps of {self.batch} samples at lr "
                                     f"{self.lr}; loss {judged} {info['before']:.4g} → {info['after']:.4g} "
                                     + (f"at step {info['step']}, kept (fitted batches {info['fitted_before']:.4g} → "
                                        f"{info['fitted_after']:.4g})" if kept else
                                        f"at best: not {self.margin:.0%} lower, put back")
                                     + f"; {info['seconds']:.1f} s")
