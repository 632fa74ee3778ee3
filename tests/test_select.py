"""Selection rules that keep precision-critical tensors float, and the MatMul+Add → Gemm rewrite.

Each test builds the pattern where it appeared in a real model (magika's LayerNorm in basic ops,
BERT's attention mask, an Add before a float op, a rank-2 MatMul + bias) and checks what is planned
and what onnxruntime runs after its optimizer.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxptq
from conftest import fvi, make_model
from onnxptq.passes.verification import optimized_kernels


def q_inputs(model: onnx.ModelProto) -> set[str]:
    """Tensors the emitted model quantizes (inputs of its QuantizeLinear nodes)."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def basic_layernorm(rng) -> onnx.ModelProto:
    """MatMul → LayerNorm spelled out as mean, E[x²] − E[x]², 1/√(var + ε) → ·γ + β → MatMul."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f(16, 32), "w2": f(32, 8), "inv_n": np.float32(1 / 32), "eps": np.float32(1e-5),
             "gamma": f(32), "beta": f(32), "axes": np.array([-1], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("ReduceSum", ["h", "axes"], ["s"], name="sum"),
        helper.make_node("Mul", ["s", "inv_n"], ["mean"], name="mean"),
        helper.make_node("Mul", ["h", "h"], ["sq"], name="square"),
        helper.make_node("ReduceSum", ["sq", "axes"], ["s2"], name="sum2"),
        helper.make_node("Mul", ["s2", "inv_n"], ["ex2"], name="ex2"),
        helper.make_node("Mul", ["mean", "mean"], ["mean2"], name="mean_sq"),
        helper.make_node("Sub", ["ex2", "mean2"], ["var"], name="var"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="var_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Reciprocal", ["std"], ["rstd"], name="rstd"),
        helper.make_node("Mul", ["rstd", "gamma"], ["scale"], name="scale"),
        helper.make_node("Sub", ["h", "mean"], ["centred"], name="centre"),
        helper.make_node("Mul", ["centred", "scale"], ["normed"], name="normed"),
        helper.make_node("Add", ["normed", "beta"], ["ln"], name="shift"),
        helper.make_node("MatMul", ["ln", "w2"], ["y"], name="mm2"),
    ]
    return make_model(nodes, [fvi("x", ["N", 16])], [fvi("y", ["N", 8])], inits)


def test_normalization_statistics_stay_float(rng, tmp_path):
    model = basic_layernorm(rng)
    calib = {"x": (rng.standard_normal((40, 16)) * rng.uniform(0.1, 10, (40, 1))).astype(np.float32)}
    result = onnxptq.compile(model, calib, tmp_path / "q.onnx")
    quantized = q_inputs(onnx.load(tmp_path / "q.onnx"))
    assert not quantized & {"s", "mean", "sq", "s2", "ex2", "mean2", "var", "var_eps", "std", "rstd", "scale"}
    assert "x" in quantized and "ln" in quantized, "the layers' inputs are still quantized"
    ver = result.report["verification"]
    assert ver["coverage"] == 1.0
    # Rows whose scale differs by 100x share no grid: with float statistics the output stays close.
    assert ver["outputs"]["y"]["sqnr_db"] > 25


def attention_with_mask(rng) -> onnx.ModelProto:
    """softmax(q·kᵀ + (1 − mask)·−10000)·v with an int64 mask input, as BERT writes it."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"wq": f(16, 16), "wk": f(16, 16), "wv": f(16, 16), "one": np.float32(1),
             "big": np.float32(-10000), "axes": np.array([1], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Cast", ["mask"], ["mask_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "big"], ["bias"], name="bias"),
        helper.make_node("Unsqueeze", ["bias", "axes"], ["bias3"], name="bias3"),
        helper.make_node("Add", ["scores", "bias3"], ["masked"], name="masked"),
        helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="context"),
    ]
    return make_model(nodes, [fvi("x", ["N", 8, 16]), helper.make_tensor_value_info("mask", TensorProto.INT64,
                                                                                    ["N", 8])],
                      [fvi("y", ["N", 8, 16])], inits)


def test_mask_add_stays_float(rng, tmp_path):
    model = attention_with_mask(rng)
    mask = np.ones((40, 8), np.int64)
    mask[:, 5:] = 0
    calib = {"x": rng.standard_normal((40, 8, 16)).astype(np.float32), "mask": mask}
    result = onnxptq.compile(model, calib, tmp_path / "q.onnx")
    q = onnx.load(tmp_path / "q.onnx")
    assert not q_inputs(q) & {"bias", "bias3", "masked", "inv"}
    kernels = optimized_kernels(q)
    assert kernels["masked"] == "Add"
    # their outputs feed float ops, so both dequantize inside the kernel
    assert kernels["scores"] == kernels["context"] == "MatMulIntegerToFloat"
    assert result.report["verification"]["outputs"]["y"]["cosine"] > 0.99


def test_elementwise_feeding_only_float_ops_stays_float(rng, tmp_path):
    """Conv → Add → Tanh: no integer kernel reads the Add's result, so the Add runs in float (its
    rounding would buy no speed) while the Conv still runs on QLinearConv."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "x2"], ["a"], name="add"),
             helper.make_node("Tanh", ["a"], ["y"], name="tanh")]
    model = make_model(nodes, [fvi("x", ["N", 4, 6, 6]), fvi("x2", ["N", 8, 6, 6])], [fvi("y", ["N", 8, 6, 6])],
                       {"w": f(8, 4, 1, 1)})
    calib = {"x": f(20, 4, 6, 6), "x2": f(20, 8, 6, 6)}
    result = onnxptq.compile(model, calib, tmp_path / "q.onnx")
    kernels = optimized_kernels(onnx.load(tmp_path / "q.onnx"))
    assert kernels["add"] == "Add" and kernels["conv"] == "QLinearConv"
    assert result.report["verification"]["coverage"] == 1.0


def test_rank2_matmul_add_becomes_qgemm(rng, tmp_path):
    """onnxruntime would fuse MatMul + Add into a float Gemm; the fusion pass writes a Gemm first."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    model = make_model(nodes, [fvi("x", ["N", 16])], [fvi("y", ["N", 10])], {"w": f(16, 10), "b": f(10)})
    result = onnxptq.compile(model, {"x": f(30, 16)}, tmp_path / "q.onnx")
    q = onnx.load(tmp_path / "q.onnx")
    assert optimized_kernels(q)["mm"] == "QGemm"
    assert result.report["verification"]["coverage"] == 1.0
    assert [o.name for o in q.graph.output] == ["y"], "the graph output keeps its name"
    assert result.report["verification"]["outputs"]["y"]["sqnr_db"] > 30
