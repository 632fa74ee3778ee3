"""Integer simulation of an emitted model's weighted layers and Adds against the codes onnxruntime computes.

A quantized layer is written as DQ(x codes) → Conv/Gemm/MatMul(DQ(w codes), DQ(b codes)) → Q(y), or
without the output Q when its output stays float; onnxruntime fuses it into QLinearConv, QGemm or
QLinearMatMul (QGemm or MatMulIntegerToFloat with a float output); DQ(a), DQ(b) → Add → Q(y) into
QLinearAdd. ``read_layer`` and ``read_add`` read one such pattern back from the graph, ``simulate``
and ``simulate_add`` compute what the integer kernel must produce from the codes it reads
(``kernels/integer.py``), and ``check_layers`` runs the model on onnxruntime's fully
optimized (fused) graph with the layers' input and output tensors as extra outputs, simulates each
layer from *its own* fused input codes, and counts the differences, in output steps:

* a quantized output is compared code by code; with exact integer kernels every difference is one
  code at a float rounding tie (``explained``);
* a float output y = acc·(s_x·s_w) is compared as its accumulator rint(y / (s_x·s_w)), which must
  equal the simulated integer sum exactly (float32 represents it to ½ step while |acc| < 2²²).

Anything else (int16 saturation, a wrong zero point, a merged Q/DQ pair) is ``unexplained``.

Not checked here: MatMulNBits (the size target's int4 MatMul/Gemm). Its input is float; at
accuracy_level 4 the kernel quantizes it to int8 per block of K and sums the blocks' exact integer
dots in float, so its output matches a blockwise integer reference only to float32 summation order
(measured ≤ 0.017 of the smallest one-code step s_a·s_w at K = 256–512, blocks 32 and 128;
``tests/test_intsim.py``), not code for code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxptq import int3, runtime
from onnxptq.kernels.im2col import conv_pads
from onnxptq.kernels.integer import add_requantize, conv_accumulate, matmul_accumulate, requantize

TIE = 1e-3  # |frac − ½| below this is a rounding tie the kernel's float arithmetic may break either way
OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class QLayer:
    """A quantized Conv/Gemm/MatMul read back from a QDQ graph: the names of its input codes and of
    its output (codes, or the float output when ``y_scale`` is None), its integer parameters and its
    geometry. ``w_codes`` is [M, C/group, *k] for a Conv and [K, N] for a Gemm/MatMul; ``w_scale``
    holds one scale per output channel (or one for all)."""

    node: str
    op_type: str
    x_codes: str
    x_scale: np.float32
    x_zero: int
    w_codes: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    y: str
    y_scale: np.float32 | None
    y_zero: int
    attrs: dict

    @property
    def channel_axis(self) -> int:
        """The output's channel axis: 1 for a Conv [N, M, *O], the last for a Gemm/MatMul [..., N]."""
        return 1 if self.op_type == "Conv" else -1

    @property
    def step(self) -> np.ndarray:
        """s_x·s_w per output channel (float32, as the kernels derive it): one accumulator unit."""
        return (self.x_scale * self.w_scale).astype(np.float32)


@dataclass(frozen=True)
class QAdd:
    """A quantized Add read back from a QDQ graph (QLinearAdd): its two inputs' codes and grids, and
    its output codes and grid."""

    node: str
    a_codes: str
    a_scale: np.float32
    a_zero: int
    b_codes: str
    b_scale: np.float32
    b_zero: int
    y: str
    y_scale: np.float32
    y_zero: int
    op_type: str = "Add"


class _DQ(NamedTuple):
    """A DequantizeLinear's input name, scale, zero point and axis."""

    codes: str
    scale: np.ndarray
    zero: np.ndarray
    axis: int


class QDQGraph:
    """Lookups over one QDQ graph, shared by the pattern readers."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}

    def node(self, name: str, ops: tuple[str, ...]) -> onnx.NodeProto | None:
        return next((n for n in self.nodes if n.name == name and n.op_type in ops), None)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def folded(self, name: str) -> np.ndarray | None:
        """A constant value as onnxruntime folds it at load, or None if it is not one: an initializer,
        or a Cast or Mul of constants (unpacked int4/int2 codes, goal ``size``'s float16 scales and bias
        steps s_x·s_w), or int3 codes behind their unpacking function. A float32 Mul is one IEEE product
        in numpy as in onnxruntime."""
        p = self.producer.get(name)
        if p is None:
            return self.array(name) if name in self.inits else None
        if p.op_type == int3.FUNCTION and p.domain == int3.DOMAIN:
            return int3.unpack(self.array(p.input[0]), tuple(self.array(p.input[1])))
        args = [self.folded(i) for i in p.input]
        if any(a is None for a in args):
            return None
        if p.op_type == "Cast":
            return args[0].astype(helper.tensor_dtype_to_np_dtype(next(a.i for a in p.attribute if a.name == "to")))
        return args[0] * args[1] if p.op_type == "Mul" else None

    def dq(self, value: str) -> _DQ | None:
        """The DequantizeLinear producing ``value`` (with a constant scale, ``folded``, and zero point,
        0 where it has none — the int32 biases, goal ``size``'s weights; not blocked)."""
        p = self.producer.get(value)
        if p is None or p.op_type != "DequantizeLinear" or any(a.name == "block_size" and a.i for a in p.attribute):
            return None
        axis = next((a.i for a in p.attribute if a.name == "axis"), 1)
        scale = self.folded(p.input[1])
        if scale is None:
            return None
        zero = self.array(p.input[2]) if len(p.input) > 2 and p.input[2] else np.zeros(scale.shape, np.int64)
        return _DQ(p.input[0], scale, zero, axis)

    def constant(self, value: str) -> np.ndarray | None:
        """An integer constant (``folded``: behind the Cast that unpacks int4 and int2 at load, or the
        function that unpacks int3), as int64."""
        folded = self.folded(value)
        return None if folded is None else folded.astype(np.int64)

    def users(self, value: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if value in n.input]

    def output_q(self, node: onnx.NodeProto) -> tuple[str, np.float32, int] | None | bool:
        """(codes, scale, zero point) of the one Q reading ``node``'s output, past an absorbed
        Relu/Clip (the Q's range lies inside its bound); False if no user is a Q (a float output);
        None otherwise."""
        users = self.users(node.output[0])
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
            users = self.users(users[0].output[0])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            q = users[0]
            return q.output[0], np.float32(self.array(q.input[1])), int(self.array(q.input[2]))
        return False if not any(u.op_type == "QuantizeLinear" for u in users) else None


def _weight_channel_axis(op_type: str, attrs: dict) -> int:
    """The output-channel axis of the stored weight: Conv [M, …], Gemm [N, K] with transB else [K, N]."""
    if op_type == "Conv" or (op_type == "Gemm" and attrs.get("transB", 0)):
        return 0
    return 1


def _graph(model: onnx.ModelProto | QDQGraph) -> QDQGraph:
    return model if isinstance(model, QDQGraph) else QDQGraph(model)


def read_layer(model: onnx.ModelProto | QDQGraph, name: str) -> QLayer | None:
    """The QLayer of node ``name``, or None if it is not a Conv/Gemm/MatMul reading DQ'd input codes
    and constant per-channel integer weights (and an int32 bias, if any) whose output goes to one Q or
    stays float. Gemm only with alpha = beta = 1 and no transA (what emission writes)."""
    g = _graph(model)
    node = g.node(name, OPS)
    if node is None:
        return None
    attrs = {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                                   or attrs.get("transA", 0)):
        return None
    has_bias = len(node.input) > 2 and bool(node.input[2])
    x, w = g.dq(node.input[0]), g.dq(node.input[1])
    b = g.dq(node.input[2]) if has_bias else None
    if x is None or w is None or (has_bias and b is None):
        return None
    w_codes = g.constant(w.codes)
    bias = None if b is None else g.constant(b.codes)
    if w_codes is None or (b is not None and bias is None):
        return None
    channel = _weight_channel_axis(node.op_type, attrs)
    if w.scale.size > 1 and w.axis % w_codes.ndim != channel:
        return None
    if node.op_type != "Conv" and channel == 0:
        w_codes = w_codes.T  # [K, N]
    out = g.output_q(node)
    if out is None or (out is False and node.op_type == "Conv"):
        return None
    y, y_scale, y_zero = (node.output[0], None, 0) if out is False else out  # float: QGemm, MatMulIntegerToFloat
    return QLayer(node=name, op_type=node.op_type, x_codes=x.codes, x_scale=np.float32(x.scale),
                  x_zero=int(x.zero), w_codes=w_codes, w_scale=w.scale.astype(np.float32), bias=bias, y=y,
                  y_scale=y_scale, y_zero=y_zero, attrs=attrs)


def read_add(model: onnx.ModelProto | QDQGraph, name: str) -> QAdd | None:
    """The QAdd of node ``name``, or None if it is not an Add of two DQ'd per-tensor codes (activations
    or a constant) into one Q."""
    g = _graph(model)
    node = g.node(name, ("Add",))
    if node is None:
        return None
    a, b = g.dq(node.input[0]), g.dq(node.input[1])
    out = g.output_q(node)
    if a is None or b is None or not out or a.scale.size > 1 or b.scale.size > 1:
        return None
    return QAdd(node=name, a_codes=a.codes, a_scale=np.float32(a.scale), a_zero=int(a.zero), b_codes=b.codes,
                b_scale=np.float32(b.scale), b_zero=int(b.zero), y=out[0], y_scale=out[1], y_zero=out[2])


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def accumulate(layer: QLayer, x_codes: np.ndarray) -> np.ndarray:
    """The exact integer sums (int64) of ``layer`` on input codes ``x_codes``."""
    if layer.op_type != "Conv":
        return matmul_accumulate(x_codes, layer.x_zero, layer.w_codes, layer.bias)
    spatial = x_codes.shape[2:]
    kernel = layer.w_codes.shape[2:]
    strides = layer.attrs.get("strides", [1] * len(spatial))
    dilations = layer.attrs.get("dilations", [1] * len(spatial))
    pads = conv_pads(spatial, kernel, strides, dilations, layer.attrs.get("pads"),
                     layer.attrs.get("auto_pad", "NOTSET"))
    return conv_accumulate(x_codes, layer.x_zero, layer.w_codes, layer.bias, strides, dilations, pads,
                           layer.attrs.get("group", 1))


def simulate(layer: QLayer, x_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output codes, tie distance) of ``layer`` on input codes ``x_codes``; for a float output the
    codes are the accumulator and no tie applies (distance ∞)."""
    acc = accumulate(layer, x_codes)
    if layer.y_scale is None:
        return acc, np.full(acc.shape, np.inf, np.float32)
    multiplier = layer.x_scale * layer.w_scale / layer.y_scale  # float32, as the kernel derives it
    return requantize(acc, multiplier, layer.y_zero, axis=layer.channel_axis)


def observed_codes(layer: QLayer, y: np.ndarray) -> np.ndarray:
    """The codes of ``layer``'s output ``y`` as onnxruntime computed it (int64): the codes themselves,
    or a float output's accumulator rint(y / (s_x·s_w))."""
    if layer.y_scale is not None:
        return y.astype(np.int64)
    shape = [1] * y.ndim
    shape[layer.channel_axis] = -1
    return np.rint(y.astype(np.float64) / layer.step.astype(np.float64).reshape(shape)).astype(np.int64)


def fused_codes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors ``names`` as onnxruntime computes them on its fully optimized graph of ``model``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return dict(zip(names, runtime.session(probe, level="all").run(names, feed)))


def simulate_add(add: QAdd, a_codes: np.ndarray, b_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output codes, tie distance) of ``add`` on its input codes, with the kernel's float32 ratios."""
    return add_requantize(a_codes, add.a_zero, add.a_scale / add.y_scale, b_codes, add.b_zero,
                          add.b_scale / add.y_scale, add.y_zero)


def _inputs(item: QLayer | QAdd) -> tuple[str, ...]:
    return (item.a_codes, item.b_codes) if isinstance(item, QAdd) else (item.x_codes,)


def _compare(item: QLayer | QAdd, codes: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(onnxruntime's codes, simulated codes, tie distance) of ``item`` from the fused tensors ``codes``."""
    if isinstance(item, QAdd):
        want, tie = simulate_add(item, codes[item.a_codes], codes[item.b_codes])
        return codes[item.y].astype(np.int64), want, tie
    want, tie = simulate(item, codes[item.x_codes])
    return observed_codes(item, codes[item.y]), want, tie


def check_layers(model: onnx.ModelProto, nodes: list[str], feed: dict[str, np.ndarray]) -> dict:
    """Simulate every readable layer (Conv/Gemm/MatMul) or Add of ``nodes`` from its fused input codes
    and compare its output: layers checked (per op type), codes compared, differences explained by
    rounding ties, unexplained ones (and the layers holding them), and the largest difference in
    output steps."""
    g = QDQGraph(model)
    items = [c for c in (read_layer(g, n) or read_add(g, n) for n in nodes) if c is not None]
    names = {n for c in items for n in (*_inputs(c), c.y)}
    constants = {n: g.array(n) for n in names if n in g.inits}
    codes = fused_codes(model, sorted(names - set(constants)), feed) | constants
    total = explained = unexplained = max_diff = 0
    worst: dict[str, int] = {}
    for item in items:
        got, want, tie = _compare(item, codes)
        diff = np.abs(got - want)
        ties = (diff == 1) & (tie < TIE)
        total += diff.size
        explained += int(ties.sum())
        bad = int(((diff > 0) & ~ties).sum())
        unexplained += bad
        max_diff = max(max_diff, int(diff.max(initial=0)))
        if bad:
            worst[item.node] = int(diff.max())
    ops = {op: sum(item.op_type == op for item in items) for op in (*OPS, "Add")}
    return {"layers": len(items), "ops": {op: n for op, n in ops.items() if n}, "codes": total,
            "tie_differences": explained, "unexplained": unexplained, "max_diff": max_diff,
            "unexplained_layers": worst}
