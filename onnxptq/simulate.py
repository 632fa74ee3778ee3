"""Integer simulation of an emitted model's Conv layers against the codes onnxruntime computes.

For a Conv written as DQ(x codes) → Conv(DQ(w codes), DQ(b codes)) → Q(y), ``kernels/integer.py``
gives the codes the integer kernel must produce from the codes it reads. ``check_convs`` runs the
model on onnxruntime's fully optimized (fused) graph with the layers' input and output codes as extra
outputs, simulates each layer from *its own* fused input codes, and counts the differences: with
exact integer kernels every difference is one code at a float rounding tie (``explained``); anything
else (int16 saturation, a wrong zero point, a merged Q/DQ pair) is ``unexplained``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxptq import runtime
from onnxptq.kernels.im2col import conv_pads
from onnxptq.kernels.integer import conv_accumulate, requantize

TIE = 1e-3  # |frac − ½| below this is a rounding tie the kernel's float arithmetic may break either way


@dataclass(frozen=True)
class QConv:
    """A quantized Conv read back from a QDQ graph: the names of its input and output codes, its
    integer parameters, and its geometry."""

    node: str
    x_codes: str
    x_scale: np.float32
    x_zero: int
    w_codes: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    y_codes: str
    y_scale: np.float32
    y_zero: int
    attrs: dict


def read_conv(model: onnx.ModelProto, name: str) -> QConv | None:
    """The QConv of node ``name``, or None if it is not a Conv between Q/DQ pairs with constant
    integer weights (and an int32 bias, if any)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    node = next((n for n in graph.node if n.name == name and n.op_type == "Conv"), None)
    if node is None:
        return None

    def dq(value: str) -> tuple[str, np.ndarray, np.ndarray] | None:
        p = producer.get(value)
        if p is None or p.op_type != "DequantizeLinear" or len(p.input) < 3:
            return None
        return p.input[0], numpy_helper.to_array(inits[p.input[1]]), numpy_helper.to_array(inits[p.input[2]])

    def constant(value: str) -> np.ndarray | None:
        p = producer.get(value)
        if p is not None and p.op_type == "Cast":  # packed int4 unpacked at load
            value = p.input[0]
        return numpy_helper.to_array(inits[value]).astype(np.int64) if value in inits else None

    x, w = dq(node.input[0]), dq(node.input[1])
    b = dq(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    users = [n for n in graph.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):  # absorbed: the Q's range is inside the bound
        users = [n for n in graph.node if users[0].output[0] in n.input]
    if x is None or w is None or len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return None
    w_codes = constant(w[0])
    bias = None if b is None else constant(b[0])
    if w_codes is None or (b is not None and bias is None):
        return None
    y = users[0]
    return QConv(node=name, x_codes=x[0], x_scale=np.float32(x[1]), x_zero=int(x[2]), w_codes=w_codes,
                 w_scale=w[1].astype(np.float32), bias=bias, y_codes=y.output[0],
                 y_scale=np.float32(numpy_helper.to_array(inits[y.input[1]])),
                 y_zero=int(numpy_helper.to_array(inits[y.input[2]])),
                 attrs={a.name: _text(helper.get_attribute_value(a)) for a in node.attribute})


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def simulate(conv: QConv, x_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output codes, tie distance) of ``conv`` on input codes ``x_codes`` [N, C, *S]."""
    spatial = x_codes.shape[2:]
    kernel = conv.w_codes.shape[2:]
    strides = conv.attrs.get("strides", [1] * len(spatial))
    dilations = conv.attrs.get("dilations", [1] * len(spatial))
    pads = conv_pads(spatial, kernel, strides, dilations, conv.attrs.get("pads"), conv.attrs.get("auto_pad", "NOTSET"))
    acc = conv_accumulate(x_codes, conv.x_zero, conv.w_codes, conv.bias, strides, dilations, pads,
                          conv.attrs.get("group", 1))
    multiplier = conv.x_scale * conv.w_scale / conv.y_scale  # float32, as the kernel derives it
    return requantize(acc, multiplier, conv.y_zero)


def fused_codes(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors ``names`` as onnxruntime computes them on its fully optimized graph of ``model``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return dict(zip(names, runtime.session(probe, level="all").run(names, feed)))


def check_convs(model: onnx.ModelProto, nodes: list[str], feed: dict[str, np.ndarray]) -> dict:
    """Simulate every readable Conv of ``nodes`` from its fused input codes and compare its output
    codes: totals of codes, differences explained by rounding ties, and unexplained ones."""
    convs = [c for c in (read_conv(model, n) for n in nodes) if c is not None]
    codes = fused_codes(model, sorted({n for c in convs for n in (c.x_codes, c.y_codes)}), feed)
    total = explained = unexplained = 0
    worst: dict[str, int] = {}
    for conv in convs:
        want, tie = simulate(conv, codes[conv.x_codes])
        diff = np.abs(codes[conv.y_codes].astype(np.int64) - want)
        ties = (diff == 1) & (tie < TIE)
        total += diff.size
        explained += int(ties.sum())
        bad = int(((diff > 0) & ~ties).sum())
        unexplained += bad
        if bad:
            worst[conv.node] = int(diff.max())
    return {"layers": len(convs), "codes": total, "tie_differences": explained, "unexplained": unexplained,
            "unexplained_layers": worst}
