"""One layer's AdaQuant objective as an ONNX graph, for onnxruntime-training's gradient builder.

The graph computes exactly the loss of ``kernels/adaquant.py`` (see its module doc) from the layer's
own operator: a Conv over the layer's patches (each row is one receptive field [C, *kernel], so the
Conv keeps the node's ``group`` and kernel shape, with stride 1 and no padding: im2col already
applied the node's strides, dilations and pads), a Gemm (transB) or a MatMul:

    ŵ = Q(W + V; s_w, 0, [qmin, qmax]),  x̂ = Q(x; s_x, z_x, [0, 2ᵇ − 1]),  P = op(x̂, ŵ) + b,
    L = mean((a(P) − a(y + b₀))²)

Straight-through rounding: onnxruntime registers no gradient for Round, and a Cast to an integer
type stops gradients, so the rounding offset δ = rint(u) − u (u = v/s) is held fixed as
sg(δ) = Cast(Cast(δ·2⁶², int64), float)·2⁻⁶²: |δ| ≤ ½ keeps δ·2⁶² inside int64 and the scaling is by a
power of two, so sg(δ) = δ exactly wherever δ is a multiple of 2⁻⁶² (every |u| ≥ 2⁻³⁹), and u + sg(δ) =
rint(u) exactly: the codes are the numpy engine's. The quantizer is then written

    Q = v + s·δ  where lo ≤ rint(u) + z ≤ hi,   Q = s·(clip(rint(u) + z, lo, hi) − z)  elsewhere

(the numpy engine's value up to one rounding), whose derivatives are the numpy engine's: ∂Q/∂v = 1
inside and 0 outside, ∂Q/∂s = δ inside and clip(k) − z outside. Differentiating s·(clip(u + δ + z) −
z) instead gives the same ∂Q/∂s as (k − z) − u, the difference of two sums of size |u| that cancel:
with 8-bit inputs (|u| up to ~150 in the tests) the input step's gradient was off by 1e-4 (median;
up to 1e-2) against the numpy engine's, and 1e-6 (up to 3e-5) in this form. The activation a is a
Clip, whose gradient mask lo ≤ P ≤ hi differs from the numpy engine's strict one only where P equals
a bound.

Per-group learning rates with one optimizer: each trained group's normalized parameter θ_p (the numpy
engine's) is θ_p = θ_p⁰ + λ_p·p′ with p′ the graph's parameter, starting at 0 and λ_p the group's
learning rate, and Adam runs at learning rate 1 on p′. Scaling alone (θ = θ⁰ + λ·p′) would hand Adam
the gradient λ·∂L/∂θ, which moves θ by λ·m̂/(√v̂ + ε/λ): a different ε for each group (a test Gemm's input
step had the gradient 4.6e-6, so ε = 1e-8 against 3e-8 changed its first step by 0.4%). So the graph writes
θ = θ⁰ + λ·sg(p′) + (p′ − sg(p′)) (the same Cast stop, exact for p′ at multiples of 2⁻⁴⁰): the value is
θ⁰ + λ·p′ and ∂L/∂p′ = ∂L/∂θ, so each Adam step moves p′ by m̂/(√v̂ + ε) and θ by λ_p·m̂/(√v̂ + ε), the
numpy engine's step with the numpy engine's ε for every group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

# Parameter groups of ``kernels.adaquant``, their start (round-to-nearest) and graph names.
GROUPS = ("v", "w_scale", "bias", "x_scale")
START = {"v": 0.0, "w_scale": 1.0, "bias": 0.0, "x_scale": 1.0}
PARAM_BITS = 40  # sg(p′) exact for |p′| < 2²³ at multiples of 2⁻⁴⁰ (Adam moves p′ by about 1 per step)
OPSET = 17


@dataclass(frozen=True)
class LayerOp:
    """The layer's operator: ``Conv`` with its ``kernel`` shape, ``Gemm`` or ``MatMul``."""

    op_type: str
    kernel: tuple[int, ...] | None = None

    def rows_to_input(self, x: np.ndarray) -> np.ndarray:
        """Rows [G, B, K] as the graph input x [B, G·K] (a Conv's patches [B, C, *kernel], flattened)."""
        return x[0] if len(x) == 1 else np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(x.shape[1], -1)


def theta_of(values: dict[str, np.ndarray], problem, lr: dict[str, float]) -> dict[str, np.ndarray]:
    """The numpy engine's parameters θ (normalized units) of the graph parameters p′ in ``values``:
    θ = θ⁰ + λ·p′ with λ the group's learning rate (module doc); groups that do not train keep θ⁰."""
    theta = problem.initial()
    for name, value in values.items():
        theta[name] = (START[name] + lr[name] * value).astype(theta[name].dtype)
    return theta


class _Builder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def const(self, value, name: str | None = None) -> str:
        self.count += 1
        name = name or f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def shape_const(self, shape: list[int]) -> str:
        self.count += 1
        self.inits.append(numpy_helper.from_array(np.asarray(shape, np.int64), f"shape{self.count}"))
        return f"shape{self.count}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def stop(self, d: str, bits: int = 62) -> str:
        """d forward, no gradient: exact where d is a multiple of 2⁻ᵇⁱᵗˢ and |d| < 2⁶³⁻ᵇⁱᵗˢ (module doc)."""
        scaled = self.op("Cast", self.op("Mul", d, self.const(2.0**bits)), to=TensorProto.INT64)
        return self.op("Mul", self.op("Cast", scaled, to=TensorProto.FLOAT), self.const(2.0**-bits))

    def group(self, start: float, scale: float, param: str) -> str:
        """θ = start + λ·p′ forward, ∂θ/∂p′ = 1 (module doc): start + λ·sg(p′) + (p′ − sg(p′))."""
        held = self.stop(param, PARAM_BITS)
        value = self.op("Add", self.const(start), self.op("Mul", self.const(scale), held))
        return self.op("Add", value, self.op("Sub", param, held))

    def quantize(self, v: str, step: str, zero: float, lo: float, hi: float) -> str:
        """Q(v; s, z, [lo, hi]) written for its gradients (module doc): v + s·δ where the code is
        inside the clip, s·(clip(k) − z) outside, with δ = rint(u) − u held fixed."""
        u = self.op("Div", v, step)
        delta = self.stop(self.op("Sub", self.op("Round", u), u))  # |δ| ≤ ½
        code = self.op("Add", u, delta)  # rint(u), exactly
        if zero:
            code = self.op("Add", code, self.const(zero))
        inside = self.op("Cast", self.op("And", self.op("GreaterOrEqual", code, self.const(lo)),
                                         self.op("LessOrEqual", code, self.const(hi))), to=TensorProto.FLOAT)
        clipped = self.op("Clip", code, self.const(lo), self.const(hi))
        if zero:
            clipped = self.op("Sub", clipped, self.const(zero))
        kept = self.op("Mul", inside, self.op("Add", v, self.op("Mul", step, delta)))
        outside = self.op("Mul", self.op("Sub", self.const(1.0), inside), self.op("Mul", clipped, step))
        return self.op("Add", kept, outside)

    def clip(self, v: str, bound: tuple[float, float]) -> str:
        lo, hi = bound
        return self.op("Clip", v, self.const(lo) if np.isfinite(lo) else "", self.const(hi) if np.isfinite(hi) else "")


def layer_model(problem, op: LayerOp, lr: dict[str, float]) -> tuple[ModelProto, list[str]]:
    """The loss graph of ``problem`` (a ``kernels.adaquant.LayerProblem``) with inputs x [B, G·K] (see
    ``LayerOp.rows_to_input``) and y [B, M] (pre-bias fp32 outputs), output "loss"; and the names of
    its trained parameters (the groups ``problem.learning()`` marks, as p′ = 0)."""
    b = _Builder()
    learning = problem.learning()
    trained = [name for name in GROUPS if learning[name]]
    params = {}
    for name in trained:
        params[name] = b.const(np.zeros_like(problem.initial()[name]), name)
    m, k = problem.weight.shape
    step0 = problem.w_step
    nb = step0.shape[1]

    def per_k(per_block: str) -> str:
        """[M, nb] → [M, K] (column j reads block j // block); [M, 1] broadcasts as it is."""
        if nb == 1:
            return per_block
        index = numpy_helper.from_array(np.arange(k, dtype=np.int64) // problem.block, "block_index")
        b.inits.append(index)
        return b.op("Gather", per_block, index.name, axis=1)

    theta = {name: b.group(START[name], lr[name], params[name]) for name in trained}
    w = b.const(problem.weight)
    if "v" in theta:
        w = b.op("Add", w, b.op("Mul", theta["v"], b.const(problem.repeat(step0))))
    s_w = b.op("Mul", b.const(step0), theta["w_scale"])
    w_hat = b.quantize(w, per_k(s_w), 0.0, *problem.w_range)
    x = "x"
    if problem.x_step is not None:
        s_x = b.const(np.full(1, problem.x_step))
        if "x_scale" in theta:
            s_x = b.op("Mul", s_x, theta["x_scale"])
        x = b.quantize(x, s_x, float(problem.x_zero), *problem.x_range)
    bias = b.const(problem.bias)
    if "bias" in theta:
        bias = b.op("Add", bias, b.op("Mul", theta["bias"], b.const(problem.bias_unit)))
    groups = problem.groups
    if op.op_type == "Conv":
        # Reshaped only here: onnxruntime broadcasts a [1] step over [B, C, 1, 1] element by element
        # (7 ms against 0.5 ms for [B, C·1·1] on a 256×480 pointwise layer's patches).
        patches = b.op("Reshape", x, b.shape_const([-1, groups * k // int(np.prod(op.kernel)), *op.kernel]))
        kernel_w = b.op("Reshape", w_hat, b.shape_const([m, -1, *op.kernel]))
        pre = b.op("Conv", patches, kernel_w, bias, group=groups, kernel_shape=list(op.kernel))
        pre = b.op("Reshape", pre, b.shape_const([-1, m]))
    elif op.op_type == "Gemm":
        pre = b.op("Gemm", x, w_hat, bias, transB=1)
    else:
        pre = b.op("Add", b.op("MatMul", x, b.op("Transpose", w_hat, perm=[1, 0])), bias)
    target = b.op("Add", "y", b.const(problem.fp32_bias))
    if problem.bound is not None:
        pre, target = b.clip(pre, problem.bound), b.clip(target, problem.bound)
    err = b.op("Sub", pre, target)
    if problem.weight_term:
        drift = b.op("Sub", w_hat, b.const(problem.anchor_weight()))
        response = b.op("ReduceMean", b.op("Mul", err, err), keepdims=0)
        penalty = b.op("Mul", b.const(np.float32(problem.weight_term)),
                       b.op("ReduceSum", b.op("Mul", drift, drift), keepdims=0))
        b.nodes.append(helper.make_node("Add", [response, penalty], ["loss"], name="loss"))
    else:
        b.nodes.append(helper.make_node("ReduceMean", [b.op("Mul", err, err)], ["loss"], name="loss", keepdims=0))
    graph = helper.make_graph(
        b.nodes, "adaquant_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", groups * k]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", m])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # onnxruntime 1.19 (the training engine's) reads IR ≤ 10
    return model, trained
