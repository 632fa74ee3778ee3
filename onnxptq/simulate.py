"""Integer simulation of an emitted model's weighted layers against the codes onnxruntime computes.

A quantized layer is written as DQ(x codes) → Conv/Gemm/MatMul(DQ(w codes), DQ(b codes)) → Q(y), or
without the output Q when its output stays float; onnxruntime fuses it into QLinearConv, QGemm or
QLinearMatMul (QGemm or MatMulIntegerToFloat with a float output). ``read_layer`` reads one such
pattern back from the graph, ``simulate`` computes what the integer kernel must produce from the codes
it reads (``kernels/integer.py``), and ``check_layers`` runs the model on onnxruntime's fully
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
(measured ≤ 0.007 of one activation code's effect, ``tests/test_intsim.py``), not code for code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxptq import runtime
from onnxptq.kernels.im2col import conv_pads
from onnxptq.kernels.integer import conv_accumulate, matmul_accumulate, requantize

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


def _weight_channel_axis(op_type: str, attrs: dict) -> int:
    """The output-channel axis of the stored weight: Conv [M, …], Gemm [N, K] with transB else [K, N]."""
    if op_type == "Conv" or (op_type == "Gemm" and attrs.get("transB", 0)):
        return 0
    return 1


def read_layer(model: onnx.ModelProto, name: str) -> QLayer | None:
    """The QLayer of node ``name``, or None if it is not a Conv/Gemm/MatMul reading DQ'd input codes
    and constant per-channel integer weights (and an int32 bias, if any) whose output goes to one Q or
    stays float. Gemm only with alpha = beta = 1 and no transA (what emission writes)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    node = next((n for n in graph.node if n.name == name and n.op_type in OPS), None)
    if node is None:
        return None
    attrs = {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
                                   or attrs.get("transA", 0)):
        return None

    def dq(value: str) -> tuple[str, np.ndarray, np.ndarray, onnx.NodeProto] | None:
        p = producer.get(value)
        if p is None or p.op_type != "DequantizeLinear" or len(p.input) < 3 \
                or any(a.name == "block_size" and a.i for a in p.attribute):
            return None
        return (p.input[0], numpy_helper.to_array(inits[p.input[1]]), numpy_helper.to_array(inits[p.input[2]]), p)

    def constant(value: str) -> np.ndarray | None:
        p = producer.get(value)
        if p is not None and p.op_type == "Cast":  # packed int4 unpacked at load
            value = p.input[0]
        return numpy_helper.to_array(inits[value]).astype(np.int64) if value in inits else None

    x, w = dq(node.input[0]), dq(node.input[1])
    b = dq(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if x is None or w is None or (len(node.input) > 2 and node.input[2] and b is None):
        return None
    w_codes = constant(w[0])
    bias = None if b is None else constant(b[0])
    if w_codes is None or (b is not None and bias is None):
        return None
    channel = _weight_channel_axis(node.op_type, attrs)
    w_axis = next((a.i for a in w[3].attribute if a.name == "axis"), 1)
    if w[1].size > 1 and w_axis % w_codes.ndim != channel:
        return None
    if node.op_type != "Conv" and channel == 0:
        w_codes = w_codes.T  # [K, N]
    users = [n for n in graph.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):  # absorbed: the Q's range is inside the bound
        users = [n for n in graph.node if users[0].output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        q = users[0]
        y, y_scale = q.output[0], np.float32(numpy_helper.to_array(inits[q.input[1]]))
        y_zero = int(numpy_helper.to_array(inits[q.input[2]]))
    elif node.op_type != "Conv" and not any(u.op_type == "QuantizeLinear" for u in users):
        y, y_scale, y_zero = node.output[0], None, 0  # float output (QGemm, MatMulIntegerToFloat)
    else:
        return None
    return QLayer(node=name, op_type=node.op_type, x_codes=x[0], x_scale=np.float32(x[1]), x_zero=int(x[2]),
                  w_codes=w_codes, w_scale=w[1].astype(np.float32), bias=bias, y=y, y_scale=y_scale,
                  y_zero=y_zero, attrs=attrs)


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


def check_layers(model: onnx.ModelProto, nodes: list[str], feed: dict[str, np.ndarray]) -> dict:
    """Simulate every readable layer of ``nodes`` from its fused input codes and compare its output:
    layers checked (per op type), codes compared, differences explained by rounding ties, unexplained
    ones (and the layers holding them), and the largest difference in output steps."""
    layers = [c for c in (read_layer(model, n) for n in nodes) if c is not None]
    codes = fused_codes(model, sorted({n for c in layers for n in (c.x_codes, c.y)}), feed)
    total = explained = unexplained = max_diff = 0
    worst: dict[str, int] = {}
    for layer in layers:
        want, tie = simulate(layer, codes[layer.x_codes])
        diff = np.abs(observed_codes(layer, codes[layer.y]) - want)
        ties = (diff == 1) & (tie < TIE)
        total += diff.size
        explained += int(ties.sum())
        bad = int(((diff > 0) & ~ties).sum())
        unexplained += bad
        max_diff = max(max_diff, int(diff.max(initial=0)))
        if bad:
            worst[layer.node] = int(diff.max())
    ops = {op: sum(layer.op_type == op for layer in layers) for op in OPS}
    return {"layers": len(layers), "ops": {op: n for op, n in ops.items() if n}, "codes": total,
            "tie_differences": explained, "unexplained": unexplained, "max_diff": max_diff,
            "unexplained_layers": worst}
