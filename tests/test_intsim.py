"""Integer simulation of the fused MatMul/Gemm kernels (QLinearMatMul, QGemm, MatMulIntegerToFloat) and
QLinearAdd against the codes onnxruntime computes, at W8A8 and at 4-bit semantics on int8 kernels."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxptq
from conftest import fvi, make_model
from onnxptq.passes.verification import optimized_kernels
from onnxptq.simulate import (TIE, accumulate, check_layers, fused_codes, observed_codes, read_add, read_layer,
                              simulate, simulate_add)
from onnxptq.target import host_has_int32_dot


def dense(rng: np.random.Generator, last: str) -> onnx.ModelProto:
    """x [N, 4, 24] → MatMul → Add(bias) → Relu → Reshape [-1, 32] → Gemm(transB) → Relu → ``last``
    (MatMul, or Gemm with a bias) as the float graph output."""
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w1": f(24, 32), "b1": f(32), "w2": f(16, 32), "b2": f(16), "w3": f(16, 10), "b3": f(10),
             "shape": np.array([-1, 32], np.int64)}
    head = helper.make_node("MatMul", ["r2", "w3"], ["y"], name="out") if last == "MatMul" else \
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="out")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Reshape", ["r1", "shape"], ["f1"], name="flat"),
             helper.make_node("Gemm", ["f1", "w2", "b2"], ["g2"], name="fc2", transB=1),
             helper.make_node("Relu", ["g2"], ["r2"], name="relu2"), head]
    if last == "MatMul":
        del inits["b3"]
    return make_model(nodes, [fvi("x", ["N", 4, 24])], [fvi("y", [None, 10])], inits)


KERNELS = {"MatMul": {"mm1": "QLinearMatMul", "fc2": "QGemm", "out": "MatMulIntegerToFloat"},
           "Gemm": {"mm1": "QLinearMatMul", "fc2": "QGemm", "out": "QGemm"}}
ADD = {"add1": "QLinearAdd"}  # the MatMul's bias, a constant input
BITS = {"W8A8": {}, "W4A4": {"w_bits": 4, "a_bits": 4, "first_last_8bit": False}}


def compile_dense(last: str, bits: str, target: str = "ort-cpu-avx2", **options):
    rng = np.random.default_rng(0)
    model = dense(rng, last)
    x = rng.standard_normal((40, 4, 24)).astype(np.float32)
    result = onnxptq.compile(model, {"x": x[:24]}, target=target, **BITS[bits], **options)
    return result, x[24:]


def integer_reference(layer, x_codes: np.ndarray) -> np.ndarray:
    """The layer's accumulator from ONNX's reference MatMulInteger (independent of numpy's matmul
    in ``kernels/integer.py``), plus the int32 bias."""
    node = helper.make_node("MatMulInteger", ["x", "w", "zx"], ["acc"])
    acc = ReferenceEvaluator(node).run(None, {"x": x_codes, "w": layer.w_codes.astype(np.int8),
                                              "zx": np.array(layer.x_zero, x_codes.dtype)})[0]
    return acc.astype(np.int64) + (0 if layer.bias is None else layer.bias)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("last", KERNELS)
def test_dense_kernels_match_integer_simulation(last, bits):
    """Each fused MatMul/Gemm kernel's output (codes, or a float output's accumulator) equals the
    numpy integer simulation from the codes the fused graph feeds it; a difference is allowed only as
    one code at a rounding tie, and each one is checked to be at a tie."""
    result, x = compile_dense(last, bits)
    q = result.model
    assert {n: optimized_kernels(q)[n] for n in {**KERNELS[last], **ADD}} == {**KERNELS[last], **ADD}
    assert result.report["verification"]["coverage"] == 1.0
    layers = {n: read_layer(q, n) for n in KERNELS[last]}
    assert layers["out"].y_scale is None and layers["mm1"].y_scale is not None, "float and coded outputs"
    codes = fused_codes(q, sorted({t for c in layers.values() for t in (c.x_codes, c.y)}), {"x": x})
    for name, layer in layers.items():
        x_codes = codes[layer.x_codes]
        if bits == "W4A4" and name != "mm1":
            assert x_codes.max() == 15, "4-bit inputs use their 16 codes and no more"
            assert np.abs(layer.w_codes).max() == 7
        np.testing.assert_array_equal(accumulate(layer, x_codes), integer_reference(layer, x_codes))
        want, tie = simulate(layer, x_codes)
        diff = np.abs(observed_codes(layer, codes[layer.y]) - want)
        assert ((diff == 0) | ((diff == 1) & (tie < TIE))).all(), (name, diff.max())
        assert (diff > 0).mean() <= 0.01
    add = read_add(q, "add1")
    assert add.b_codes in {i.name for i in q.graph.initializer}
    a_codes, y = fused_codes(q, [add.a_codes, add.y], {"x": x}).values()
    bias = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == add.b_codes))
    want, tie = simulate_add(add, a_codes, bias)
    diff = np.abs(y.astype(np.int64) - want)
    assert ((diff == 0) | ((diff == 1) & (tie < TIE))).all() and want.max() > want.min()
    report = result.report["verification"]["integer_simulation"]
    assert report["ops"] == {"Gemm": 1 + (last == "Gemm"), "MatMul": 1 + (last == "MatMul"), "Add": 1}, report
    assert report["unexplained"] == 0 and report["max_diff"] <= 1, report


def test_float_output_accumulator_round_trips(rng):
    """A float output y = float32(acc)·float32(s_x·s_w) gives back acc exactly by rint(y / step)
    for |acc| < 2²², the range the simulation's float-output comparison relies on."""
    result, _ = compile_dense("Gemm", "W8A8")
    layer = read_layer(result.model, "out")
    acc = rng.integers(-(2 ** 22), 2 ** 22, (64, layer.w_codes.shape[1]))
    y = acc.astype(np.float32) * layer.step
    np.testing.assert_array_equal(observed_codes(layer, y), acc)
    assert (observed_codes(layer, y + layer.step) - acc == 1).all(), "one accumulator step is one code"


@pytest.mark.skipif(host_has_int32_dot(), reason="this CPU accumulates u8×s8 in int32: cannot saturate")
def test_dense_simulation_catches_int16_saturation():
    """Full-range 8-bit weights (the VNNI grid) saturate vpmaddubsw's int16 pairs in QLinearMatMul on
    this CPU: the simulation reports those codes as unexplained, while the pair-safe grid is exact."""
    saturating, _ = compile_dense("MatMul", "W8A8", target="ort-cpu-vnni", weight_method="minmax")
    safe, _ = compile_dense("MatMul", "W8A8", weight_method="minmax")
    bad = saturating.report["verification"]["integer_simulation"]
    assert bad["unexplained"] > 0 and bad["max_diff"] > 1 and "mm1" in bad["unexplained_layers"], bad
    assert safe.report["verification"]["integer_simulation"]["unexplained"] == 0


def test_unreadable_layers_are_skipped(rng):
    """Layers the simulation cannot model (float input: no DQ'd codes) are not counted as checked."""
    model = dense(rng, "MatMul")
    assert read_layer(model, "mm1") is None
    check = check_layers(model, ["mm1", "fc2"], {"x": rng.standard_normal((1, 4, 24)).astype(np.float32)})
    assert check["layers"] == 0 and check["codes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_real_model_dense_integer_simulation(bits, tmp_path):
    """magika through the public compile API: its Conv, Dense Gemm (QGemm, float output) and Dense
    MatMul (MatMulIntegerToFloat) are all simulated exactly; at W4A4 without 8-bit first/last layers
    the Dense layers read 4-bit codes with 4-bit weights."""
    import importlib

    ex = importlib.import_module("examples.magika.example")
    options = {"w_bits": 4, "a_bits": 4, "first_last_8bit": False} if bits == "W4A4" else {}
    result = onnxptq.compile(ex.fp32_model(), ex.calibration_set(32), tmp_path / "q.onnx", pipeline="calibration",
                             **options)
    ver = result.report["verification"]
    assert ver["coverage"] == 1.0, ver["float_leftovers"]
    sim = ver["integer_simulation"]
    assert {op: sim["ops"].get(op) for op in ("Conv", "Gemm", "MatMul")} == {"Conv": 1, "Gemm": 1, "MatMul": 1}, sim
    assert sim["unexplained"] == 0 and sim["tie_differences"] <= 1e-3 * sim["codes"] and sim["max_diff"] <= 1, sim
    kernels = {layer["op"]: (layer["w_bits"], layer["kernel"]) for layer in result.report["layers"]}
    w = 4 if bits == "W4A4" else 8
    assert kernels == {"Conv": (w, "QLinearConv"), "Gemm": (w, "QGemm"), "MatMul": (w, "MatMulIntegerToFloat")}


def blockwise_int8_reference(x: np.ndarray, w_codes: np.ndarray, w_scale: np.ndarray, block: int):
    """MatMulNBits at accuracy_level 4 as integer arithmetic: each block of ``block`` activations along
    K is quantized symmetric int8 at s_a = max|x|/127, codes rint(x·127/max|x|); per block the dot
    of those codes with the int4 weight codes is exact, and the blocks' dots are summed in float at
    s_a·s_w[b, n]. Returns (y, the smallest one-code change s_a·s_w over the blocks, per output,
    and the activation codes' distance to a rounding tie)."""
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    amax = np.abs(xb).max(-1)
    s_a = (amax / np.float32(127)).astype(np.float32)
    scaled = xb * np.where(amax > 0, np.float32(127) / amax, 0).astype(np.float32)[..., None]
    dots = np.einsum("mbk,bkn->mbn", np.rint(scaled).astype(np.int64), w_codes.reshape(k // block, block, -1))
    steps = s_a[:, :, None].astype(np.float64) * w_scale[None].astype(np.float64)
    return (dots * steps).sum(1), steps.min(1), np.abs(scaled - np.floor(scaled) - 0.5)


def test_matmulnbits_is_blockwise_int8_up_to_float_summation(rng):
    """The size target's int4 MatMul runs as MatMulNBits (accuracy_level 4: activations quantized to
    int8 per block of K inside the kernel). Its output equals the blockwise integer reference up to
    the float summation of the blocks: far below one activation code's effect (measured ≤ 0.017 of
    the smallest one-code step), while float activations would differ by whole codes."""
    k, n, block = 256, 64, 32
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        helper.make_node("Tanh", ["h"], ["y"], name="tanh")], [fvi("x", ["N", k])],
                       [fvi("y", ["N", n])], {"w": (rng.standard_normal((k, n)) * 0.1).astype(np.float32)})
    x = (rng.standard_normal((64, k)) * np.exp(rng.standard_normal((1, k)))).astype(np.float32)
    q = onnxptq.compile(model, {"x": x[:48]}, target="ort-cpu-size", w_bits=4, first_last_8bit=False,
                        pipeline="calibration", block_size=block, short_names=False).model
    assert optimized_kernels(q)["mm"] == "MatMulNBits"
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    w_codes, w_scale = inits["w_quantized"].astype(np.int64), inits["w_scale"]
    y = fused_codes(q, ["h"], {"x": x[48:]})["h"].astype(np.float64)
    want, step, tie = blockwise_int8_reference(x[48:], w_codes, w_scale, block)
    assert tie.min() > 1e-5, "no activation code at a rounding tie: the comparison below is exact in codes"
    assert (np.abs(y - want) / step).max() < 0.05
    float_acts = x[48:].astype(np.float64) @ (w_codes * np.repeat(w_scale, block, 0))
    assert (np.abs(y - float_acts) / step).max() > 1, "the reference has teeth: int8 activations matter"


def test_three_bit_codes_are_read_through_their_unpacking_function():
    """Under the size target 3-bit weights are stored eight per three bytes behind ``Int3ToInt8``: the
    verification's integer simulation reads the codes back through it and matches onnxruntime."""
    result, _ = compile_dense("MatMul", "W8A8", target="ort-cpu-size", w_bits=3, first_last_8bit=False)
    q = result.model
    assert sum(n.op_type == "Int3ToInt8" for n in q.graph.node) == 3
    codes = read_layer(q, "mm1").w_codes
    assert codes.min() >= -3 and codes.max() == 3
    report = result.report["verification"]["integer_simulation"]
    assert report["ops"] == {"Gemm": 1, "MatMul": 2, "Add": 1} and report["unexplained"] == 0, report
