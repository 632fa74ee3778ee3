"""Probe: which of onnxruntime's u8×s8 integer kernels saturate int16 pairs on this CPU, and in which order.

    python -m benchmarks.probe_saturation

x86 CPUs without VNNI multiply u8 activations by s8 weights with ``vpmaddubsw``, which adds two
adjacent products into a saturating int16. For each fused kernel (QLinearConv regular / pointwise /
depthwise / grouped, QGemm, QLinearMatMul) this builds a tiny QDQ model (uint8 activations with zero
point 0 or 128, int8 symmetric per-channel weights, zero int32 bias) with uniformly random full-range codes
— 3.5% of adjacent product pairs then leave int16, enough to move most output codes — runs it at
ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL, and compares its output codes with

* ``exact``: the int64 accumulator acc = Σ_k (x_k − z_x)·w_k (the bias is 0);
* one int16-pair model per candidate reduction order: the same sum as vpmaddubsw computes it on the raw
  codes — the reduction laid out in that order, products summed in adjacent pairs (0,1), (2,3), …
  clipped to int16, then widened — minus the exact zero-point term z_x·Σ_k w_k.

Scales are powers of two, so requantization y = rint(acc·2⁻ᵗ) + 128 is exact in float32 and any
mismatch is the accumulator's. The model that matches every output code, at both levels and both zero
points, is what the kernel computes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxptq import runtime
from onnxptq.kernels.saturation import int16_pair_dot
from onnxptq.target import host_has_int32_dot

S_X, S_W = 2.0**-4, 2.0**-6
Y_ZP = 128
PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Transpose"}


@dataclass
class Case:
    """One kernel under test: its model (built for a requantization shift), the uint8 input codes, and
    per candidate reduction order the (x, w) code arrays whose last axis is the reduction in that order
    (they broadcast to [outputs…, K]; ``to_output`` reshapes the accumulators to the model's output)."""

    name: str
    model: Callable[[int], onnx.ModelProto]
    feed: np.ndarray
    orders: dict[str, tuple[np.ndarray, np.ndarray]]
    to_output: Callable[[np.ndarray], np.ndarray]


def accumulate(x: np.ndarray, w: np.ndarray, zp: int, saturate: bool) -> np.ndarray:
    """acc = Σ x·w − zp·Σ w over the last axis (raw codes x); with ``saturate``, Σ x·w is summed in
    saturating int16 pairs (0,1), (2,3), … as vpmaddubsw does."""
    w = w.astype(np.int64)
    dot = int16_pair_dot(x, w) if saturate else (x.astype(np.int64) * w).sum(axis=-1)
    return dot - zp * w.sum(axis=-1)


def _qdq_model(op_node: onnx.NodeProto, x_shape: list[int], w: np.ndarray, w_axis: int, n_out: int,
               shift: int, x_zp: int, y_shape: list[int]) -> onnx.ModelProto:
    """x(u8) → DQ → op(DQ(w int8 per channel)[, DQ(b int32 = 0)]) → Q(u8) = y, scales powers of two."""
    s_y = S_X * S_W * 2.0**shift
    inits = {
        "x_s": np.float32(S_X), "x_z": np.uint8(x_zp),
        "w_q": w.astype(np.int8), "w_s": np.full(n_out, S_W, np.float32), "w_z": np.zeros(n_out, np.int8),
        "b_q": np.zeros(n_out, np.int32), "b_s": np.full(n_out, S_X * S_W, np.float32),
        "b_z": np.zeros(n_out, np.int32), "y_s": np.float32(s_y), "y_z": np.uint8(Y_ZP),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf"], name="dqx"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wf"], name="dqw", axis=w_axis),
        *([helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["bf"], name="dqb", axis=0)]
          if "bf" in op_node.input else []),
        op_node,
        helper.make_node("QuantizeLinear", ["yf", "y_s", "y_z"], ["y"], name="qy"),
    ]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, y_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_case(name: str, rng: np.random.Generator, c: int, m: int, k: int, group: int, x_zp: int,
              hw: int = 8) -> Case:
    """QLinearConv on a [2, c, hw, hw] input, pads k//2 (padded taps hold the raw code z_x, as in im2col).

    Orders: flattened (kh, kw, c) or ONNX's (c, kh, kw) per group, and (kh, kw, c) with c padded to
    even per tap (no pair straddles two taps) when C/group is odd."""
    cg, mg, pad = c // group, m // group, k // 2
    w = rng.integers(-127, 128, size=(m, cg, k, k))
    x = rng.integers(0, 256, size=(2, c, hw, hw)).astype(np.uint8)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=x_zp)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))  # [n, c, oh, ow, kh, kw]
    x_g = win.reshape(2, group, cg, hw, hw, k, k).transpose(0, 1, 3, 4, 5, 6, 2)  # [n, g, oh, ow, kh, kw, c]
    w_g = w.reshape(group, mg, cg, k, k).transpose(0, 1, 3, 4, 2)  # [g, mg, kh, kw, c]

    def layout(xs: np.ndarray, ws: np.ndarray, perm: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """x as [n, g, 1, oh, ow, K] and w as [1, g, mg, 1, 1, K], K in ``perm`` of (kh, kw, c)."""
        xv = xs.transpose(0, 1, 2, 3, *(4 + p for p in perm)).reshape(2, group, 1, hw, hw, -1)
        wv = ws.transpose(0, 1, *(2 + p for p in perm)).reshape(1, group, mg, 1, 1, -1)
        return xv, wv

    orders = {"kh,kw,c": layout(x_g, w_g, (0, 1, 2)), "c,kh,kw": layout(x_g, w_g, (2, 0, 1))}
    if cg % 2:
        even = ((0, 0),) * 6 + ((0, 1),)
        orders["kh,kw,c/tap"] = layout(np.pad(x_g, even), np.pad(w_g, even[2:]), (0, 1, 2))

    def model(shift: int) -> onnx.ModelProto:
        node = helper.make_node("Conv", ["xf", "wf", "bf"], ["yf"], name="op", group=group, pads=[pad] * 4)
        return _qdq_model(node, [2, c, hw, hw], w, 0, m, shift, x_zp, [2, m, hw, hw])

    return Case(name, model, x, orders, lambda acc: acc.reshape(2, m, hw, hw))


def matmul_case(name: str, rng: np.random.Generator, op: str, kdim: int, x_zp: int) -> Case:
    """QGemm (transB, B [N, K], axis 0) or QLinearMatMul (B [K, N], axis 1) on a [32, K] input.

    Orders: consecutive K, pairs (0,1), (2,3), …; and the same shifted by one, pairs (1,2), (3,4), …"""
    n = 16
    w_nk = rng.integers(-127, 128, size=(n, kdim))
    x = rng.integers(0, 256, size=(32, kdim)).astype(np.uint8)
    shifted = ((0, 0), (1, 0))
    orders = {"k": (x[:, None, :], w_nk[None]),
              "k from 1": (np.pad(x, shifted)[:, None, :], np.pad(w_nk, shifted)[None])}

    def model(shift: int) -> onnx.ModelProto:
        if op == "Gemm":
            node = helper.make_node("Gemm", ["xf", "wf", "bf"], ["yf"], name="op", transB=1)
            return _qdq_model(node, [32, kdim], w_nk, 0, n, shift, x_zp, [32, n])
        node = helper.make_node("MatMul", ["xf", "wf"], ["yf"], name="op")
        return _qdq_model(node, [32, kdim], w_nk.T.copy(), 1, n, shift, x_zp, [32, n])

    return Case(name, model, x, orders, lambda acc: acc)


def run_codes(model: onnx.ModelProto, level: str, feed: np.ndarray) -> tuple[np.ndarray, str]:
    """Output codes of ``model`` at optimization ``level`` and the kernel that ran the op."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        sess = runtime.session(model, threads=1, level=level, optimized_path=path)
        node = next(n for n in onnx.load(path).graph.node if n.op_type not in PLUMBING)
    layout = " (NHWC)" if node.domain == "com.microsoft" and node.op_type == "QLinearConv" else ""
    return sess.run(None, {"x": feed})[0], node.op_type + layout


def probe(case: Case, level: str, x_zp: int) -> tuple[str, int, dict[str, int]]:
    """The kernel that ran, its number of outputs, and how many of their codes differ from each model."""
    first = next(iter(case.orders.values()))
    accs = {"exact": accumulate(*first, x_zp, saturate=False)}
    accs |= {order: accumulate(*xw, x_zp, saturate=True) for order, xw in case.orders.items()}
    peak = max(np.abs(a).max() for a in accs.values())
    shift = max(int(np.ceil(np.log2(peak / 127))), 0)  # every model's codes stay inside [1, 255]
    got, kernel = run_codes(case.model(shift), level, case.feed)
    return kernel, got.size, {label: int((got != np.rint(case.to_output(acc) * 2.0**-shift) + Y_ZP).sum())
                    for label, acc in accs.items()}


def verdict(mismatch: dict[str, int]) -> str:
    """Which model the kernel computes: exact int32, int16 pairs in some order, or none of them."""
    if mismatch["exact"] == 0:
        return "exact (int32)"
    fits = [k for k, v in mismatch.items() if v == 0]
    return f"int16 pairs ({' | '.join(fits)})" if fits else "unexplained"


def cases(x_zp: int) -> list[Case]:
    rng = np.random.default_rng(0)
    return [
        conv_case("conv 3x3 Cin16", rng, 16, 8, 3, 1, x_zp),
        conv_case("conv 3x3 Cin3", rng, 3, 8, 3, 1, x_zp),
        conv_case("conv 3x3 Cin64", rng, 64, 8, 3, 1, x_zp),
        conv_case("conv 3x3 Cin32 28²", rng, 32, 8, 3, 1, x_zp, hw=28),
        conv_case("conv 1x1 Cin16", rng, 16, 8, 1, 1, x_zp),
        conv_case("conv 1x1 Cin15", rng, 15, 8, 1, 1, x_zp),
        conv_case("conv 1x1 Cin320", rng, 320, 8, 1, 1, x_zp),
        conv_case("depthwise 3x3 C16", rng, 16, 16, 3, 16, x_zp),
        conv_case("depthwise 5x5 C24", rng, 24, 24, 5, 24, x_zp),
        conv_case("depthwise x2 3x3 C8", rng, 8, 16, 3, 8, x_zp),
        conv_case("grouped 3x3 g4 C/g4", rng, 16, 8, 3, 4, x_zp),
        conv_case("grouped 3x3 g4 C/g3", rng, 12, 8, 3, 4, x_zp),
        matmul_case("QGemm K64", rng, "Gemm", 64, x_zp),
        matmul_case("QGemm K33", rng, "Gemm", 33, x_zp),
        matmul_case("QGemm K1280", rng, "Gemm", 1280, x_zp),
        matmul_case("QLinearMatMul K64", rng, "MatMul", 64, x_zp),
        matmul_case("QLinearMatMul K513", rng, "MatMul", 513, x_zp),
    ]


def main() -> None:
    print(f"onnxruntime {runtime.ort.__version__}; host has int32 u8×s8 dot products (VNNI/AMX/ARM): "
          f"{host_has_int32_dot()}")
    print("output codes differing from each model, summed over EXTENDED/ALL × z_x 0/128 (0 = what the kernel "
          "computes)\n")
    header = f"{'case':20} {'kernel (EXTENDED; ALL)':36} {'codes':>6}  {'mismatches: exact / int16 pairs in …':60} verdict"
    print(header)
    print("-" * (len(header) + 24))
    for by_zp in zip(cases(0), cases(128)):
        kernels, outs, total = [], 0, {}
        for x_zp, case in zip((0, 128), by_zp):
            for level in ("extended", "all"):
                kernel, n, mismatch = probe(case, level, x_zp)
                kernels += [kernel] if kernel not in kernels else []
                outs += n
                total = {k: total.get(k, 0) + v for k, v in mismatch.items()}
        counts = " / ".join(f"{k} {v}" for k, v in total.items())
        print(f"{by_zp[0].name:20} {'; '.join(kernels):36} {outs:>6}  {counts:60} {verdict(total)}")


if __name__ == "__main__":
    main()
