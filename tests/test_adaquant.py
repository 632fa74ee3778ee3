"""AdaQuant: gradients against finite differences, the STE and clip masks, the pass on the synthetic
CNN and on a real layer, determinism."""

import dataclasses

import numpy as np
import pytest

import onnxptq
from conftest import cnn, fvi, make_model
from onnx import helper
from onnxptq import pipelines
from onnxptq.api import PIPELINE
from onnxptq.capture import capture, layer_io
from onnxptq.kernels.adaquant import (LayerProblem, Rounding, Settings, fit, full_loss, held_rows, loss_and_grad, offsets,
                                      ste_quantize)
from onnxptq.kernels.im2col import channels_last_rows, conv_pads, im2col
from onnxptq.kernels.quant import broadcast_channel, dequantize, quantize
from onnxptq.kernels.saturation import pairs_fit, reduction_rows
from onnxptq.passes.adaquant import AdaQuantPass, input_energy, layer_problem, movable_input_step, output_bound
from onnxptq.passes.bn_reestimate import weight_codes
from onnxptq.passes.emission import emit_model, quantized_from
from test_corrections import emitted_codes


def conv_reference(x, w, strides, dilations, pads, groups):
    """Direct ONNX Conv (no bias) by nested sums over the zero-padded input, float64."""
    n, c = x.shape[:2]
    m, cg, kh, kw = w.shape
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh = (xp.shape[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    ow = (xp.shape[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    y = np.zeros((n, m, oh, ow))
    for o in range(m):
        g = o // (m // groups)
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dilations[0]:i * dilations[0] + strides[0] * oh:strides[0],
                           j * dilations[1]:j * dilations[1] + strides[1] * ow:strides[1]]
                y[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j])
    return y


def conv_problem(rng, c, m, groups, k, strides, dilations, pad, bound=None, x_step=True):
    """A Conv layer as a LayerProblem with rows from im2col, and a check that the rows reproduce the
    direct convolution (so the gradients below are a Conv's)."""
    x = rng.uniform(0, 3, (2, c, 7, 7))
    w = rng.standard_normal((m, c // groups, k, k)) * 0.3
    pads = conv_pads((7, 7), (k, k), strides, dilations, [pad] * 4)
    rows = im2col(x, (k, k), strides, dilations, pads, groups)
    y = channels_last_rows(conv_reference(x, w, strides, dilations, pads, groups))
    np.testing.assert_allclose(np.matmul(rows, w.reshape(groups, m // groups, -1).transpose(0, 2, 1))
                               .transpose(1, 0, 2).reshape(y.shape), y, atol=1e-10)
    return problem(rng, w.reshape(m, -1), groups, bound, x_step), rows, y


def problem(rng, w, groups=1, bound=None, x_step=True, block=None):
    m, k = w.shape
    block = block or k
    nb = -(-k // block)
    absmax = np.abs(np.pad(w, [(0, 0), (0, nb * block - k)]).reshape(m, nb, block)).max(axis=2)
    return LayerProblem(weight=w, w_step=absmax / 7 * 0.8, block=block, w_range=(-7, 7), groups=groups,
                        bias=rng.standard_normal(m) * 0.1, fp32_bias=rng.standard_normal(m) * 0.1,
                        bias_unit=rng.uniform(0.5, 2, m), x_step=0.02 if x_step else None, x_zero=3,
                        learn_x_step=x_step, bound=bound)


def perturbed(rng, p):
    """Parameters away from round-to-nearest, so every gradient term is exercised."""
    theta = p.initial()
    theta["v"] = rng.standard_normal(theta["v"].shape) * 0.3
    theta["w_scale"] = rng.uniform(0.9, 1.1, theta["w_scale"].shape)
    theta["bias"] = rng.standard_normal(theta["bias"].shape) * 0.1
    theta["x_scale"] = np.array([1.05])
    return theta


def check_gradients(rng, p, x, y):
    """Analytic ∂L/∂θ equals central differences of the frozen-rounding surrogate, entry by entry.
    The offsets are moved off rint(u) − u by up to ±0.3 (any fixed offset defines a surrogate): at the
    real offsets every code is an integer, so the codes ±qmax sit exactly on the clip's kink."""
    theta = perturbed(rng, p)
    real = offsets(p, theta, x)
    frozen = Rounding(*(None if d is None else d + rng.uniform(-0.3, 0.3, d.shape) for d in (real.w, real.x)))
    _, grads = loss_and_grad(p, theta, x, y, frozen)
    eps = 1e-6
    for key, g in grads.items():
        if not p.learning()[key]:
            continue
        flat = theta[key].reshape(-1)
        picks = rng.choice(flat.size, min(flat.size, 12), replace=False)
        for i in picks:
            numeric = []
            for sign in (1, -1):
                t = {k: v.copy() for k, v in theta.items()}
                t[key].reshape(-1)[i] += sign * eps
                numeric.append(loss_and_grad(p, t, x, y, frozen, grad=False)[0])
            fd = (numeric[0] - numeric[1]) / (2 * eps)
            assert abs(fd - g.reshape(-1)[i]) <= 1e-6 * max(1.0, abs(fd)), (key, i, fd, g.reshape(-1)[i])
    assert any(np.abs(g).max() > 1e-4 for g in grads.values())


@pytest.mark.parametrize("c, m, groups, k, strides, dilations, pad", [
    (3, 4, 1, 3, (1, 1), (1, 1), 1),
    (4, 6, 1, 3, (2, 2), (1, 1), 1),
    (4, 4, 1, 3, (1, 1), (2, 2), 2),
    (4, 6, 2, 3, (1, 2), (1, 1), 0),
    (5, 5, 5, 3, (2, 2), (1, 1), 1),  # depthwise
])
def test_conv_gradients_match_finite_differences(rng, c, m, groups, k, strides, dilations, pad):
    check_gradients(rng, *conv_problem(rng, c, m, groups, k, strides, dilations, pad))


def test_gradients_with_the_weight_term(rng):
    """ρ·Σ(ŵ − W)² drifting from an anchor W other than the start: its gradient through the STE joins
    the response's (a depthwise conv with a Relu bound, so every term is live)."""
    p, x, y = conv_problem(rng, 4, 4, 4, 3, (1, 1), (1, 1), 1, bound=(0.0, np.inf))
    anchor = p.weight + rng.standard_normal(p.weight.shape) * 0.05
    check_gradients(rng, dataclasses.replace(p, weight_term=0.3, anchor=anchor), x, y)


def test_input_energy_reads_rows_from_the_whole_file(tmp_path):
    # rows are cached sample after sample: the first half zeros, the second half twos
    rows = np.concatenate([np.zeros((300, 4), np.float32), np.full((300, 4), 2.0, np.float32)])
    rows.tofile(tmp_path / "x")
    assert input_energy((str(tmp_path / "x"), rows.shape), rows=100) == pytest.approx(2.0, abs=0.1)
    assert input_energy((str(tmp_path / "x"), rows.shape), rows=1000) == pytest.approx(2.0)


def test_conv_gradients_after_clip_activation(rng):
    """Loss after a Clip(0, 1): the gradient is zero where the quantized output clips."""
    p, x, y = conv_problem(rng, 3, 4, 1, 3, (1, 1), (1, 1), 1, bound=(0.0, 1.0))
    check_gradients(rng, p, x, y)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_gradients_match_finite_differences(rng, trans_b):
    """Gemm y = x·B (+ C): as rows of [M, K] whatever transB, B stored [N, K] or [K, N]."""
    x = rng.uniform(-1, 2, (9, 6))
    b_stored = rng.standard_normal((5, 6) if trans_b else (6, 5))
    w = b_stored if trans_b else b_stored.T
    y = x @ (b_stored.T if trans_b else b_stored)
    check_gradients(rng, problem(rng, w), x[None], y)


def test_matmul_batched_gradients_blocked_float_input(rng):
    """A batched MatMul [2, 3, K]·[K, N] with a blocked int4-style grid (steps per block of 4 along K,
    K = 10 not a multiple) and a float input: rows are the flattened leading axes."""
    a = rng.standard_normal((2, 3, 10))
    w_kn = rng.standard_normal((10, 4))
    y = (a @ w_kn).reshape(-1, 4)
    check_gradients(rng, problem(rng, w_kn.T, x_step=False, block=4), a.reshape(1, -1, 10), y)


def test_ste_and_clip_masks():
    v = np.array([-10.0, -0.74, 0.2, 0.76, 3.0, 10.0])
    q, inside, ds = ste_quantize(v, np.array(0.5), 0, -7, 7)
    np.testing.assert_array_equal(q, [-3.5, -0.5, 0.0, 1.0, 3.0, 3.5])
    np.testing.assert_array_equal(inside, [False, True, True, True, True, False])
    u = v / 0.5
    np.testing.assert_allclose(ds, np.where(inside, np.rint(u) - u, np.clip(np.rint(u), -7, 7)))
    # asymmetric activation grid: the clip bounds are on the codes k = rint(u) + z, and ∂Q/∂s = k − z there
    q, inside, ds = ste_quantize(np.array([-1.0, 0.3, 300.0]), np.array(1.0), 3, 0, 255)
    np.testing.assert_array_equal(q, [-1.0, 0.0, 252.0])
    np.testing.assert_array_equal(inside, [True, True, False])
    np.testing.assert_allclose(ds, [0.0, -0.3, 252.0])


def test_gradients_vanish_outside_the_clips(rng):
    """Weights beyond the clip get no STE gradient; channels whose output is clipped by the activation
    get none at all."""
    x = rng.uniform(0, 1, (1, 8, 3))
    w = np.array([[0.1, -0.2, 0.3], [5.0, 0.1, -0.1]])
    p = problem(rng, w, bound=(-100.0, 100.0))
    p.w_step = np.array([[0.05], [0.05]])  # 5.0 / 0.05 = 100 codes, far outside [−7, 7]
    y = rng.standard_normal((8, 2))
    _, grads = loss_and_grad(p, p.initial(), x, y)
    assert grads["v"][1, 0] == 0 and np.all(grads["v"][0] != 0)
    p.bound = (-100.0, -99.0)  # every output is clipped at the lower bound on both sides
    _, grads = loss_and_grad(p, p.initial(), x, y)
    assert all(np.all(g == 0) for g in grads.values())


def test_frozen_offsets_reproduce_real_rounding(rng):
    p, x, y = conv_problem(rng, 3, 4, 1, 3, (1, 1), (1, 1), 1)
    theta = perturbed(rng, p)
    real = loss_and_grad(p, theta, x, y)
    frozen = loss_and_grad(p, theta, x, y, offsets(p, theta, x))
    assert real[0] == pytest.approx(frozen[0], rel=1e-12)
    for k in real[1]:
        np.testing.assert_allclose(real[1][k], frozen[1][k], rtol=1e-9, atol=1e-12)


def test_a_fit_is_judged_on_rows_it_never_trained_on(rng):
    """The same poor 4-bit Gemm as above, but the held-out rows (the last ⅛) have targets that
    round-to-nearest reproduces exactly: every move that lowers the training rows' loss raises theirs,
    so the fit must come back as round-to-nearest; with ``holdout=0`` it is judged on the rows it
    trained on and moves."""
    x = rng.standard_normal((1, 800, 16)).astype(np.float32)
    w = (rng.standard_normal((8, 16)) * 0.3).astype(np.float32)
    p = problem(rng, w, x_step=False)
    p.w_step = (np.abs(w).max(axis=1, keepdims=True) / 7 * 1.5).astype(np.float32)
    y = x[0] @ w.T
    start = p.initial()
    w_rtn = quantize(w, p.w_step, 0, -7, 7) * p.w_step
    y[700:] = x[0, 700:] @ w_rtn.T + (p.bias - p.fp32_bias)  # pre-bias targets: fp32 bias is added back
    rows = lambda i: (x[:, i], y[i])  # noqa: E731
    judged = fit(p, rows, 800, Settings(iterations=200, holdout=0.125), seed=0)
    assert judged.loss == judged.loss_rtn == pytest.approx(0.0, abs=1e-10)
    assert all(np.array_equal(judged.theta[k], start[k]) for k in start)
    trusting = fit(p, rows, 800, Settings(iterations=200, holdout=0.0), seed=0)
    assert trusting.loss < 0.9 * trusting.loss_rtn


# ---- the pass -------------------------------------------------------------------------------------

def planned_cnn(rng, **options):
    """The synthetic CNN (conv1 absorbs a BatchNormalization) after the core passes before emission."""
    from test_corrections import planned
    return planned(cnn(rng, bn=True), rng.standard_normal((40, 3, 16, 16)).astype(np.float32), **options)


def test_fit_lowers_the_loss_where_round_to_nearest_is_poor(rng):
    """A 4-bit Gemm on correlated inputs (rounding errors add up along their shared direction) with
    steps 1.5× too coarse and a bias off by 0.2: the fit must more than halve the loss."""
    z = rng.standard_normal((2000, 16)).astype(np.float32)
    x = (z + 2 * z[:, :1]).astype(np.float32)[None]  # every input shares the first component
    w = (rng.standard_normal((8, 16)) * 0.3).astype(np.float32)
    y = x[0] @ w.T
    p = problem(rng, w, x_step=False)
    p.w_step = (np.abs(w).max(axis=1, keepdims=True) / 7 * 1.5).astype(np.float32)
    p.bias, p.fp32_bias = np.full(8, 0.2, np.float32), np.zeros(8, np.float32)
    p.bias_unit = y.std(axis=0).astype(np.float32)
    rows = lambda i: (x[:, i], y[i])  # noqa: E731
    result = fit(p, rows, 2000, Settings(iterations=300), seed=0)
    assert result.loss < 0.5 * result.loss_rtn, (result.loss, result.loss_rtn)
    assert result.loss == pytest.approx(full_loss(p, result.theta, rows, held_rows(2000, Settings().holdout)))


@pytest.mark.parametrize("w_bits", [4, 8])
def test_pass_writes_exact_codes_and_lowers_each_layers_loss(rng, w_bits):
    state = planned_cnn(rng, w_bits=w_bits, target="ort-cpu-avx2")
    AdaQuantPass(iterations=200).run(state)
    rows = next(p for p in state.report.passes if p["name"] == "adaquant")["layers"]
    assert all(r["loss"] <= r["rtn_loss"] for r in rows)
    assert any(r["loss"] < 0.9 * r["rtn_loss"] for r in rows), rows
    codes = emitted_codes(state)
    for name, layer in state.plan.layers.items():
        grid = layer.grid
        if grid.block_size:  # int4 MatMulNBits: one step per (block of K, column)
            w_kn = layer.weight if grid.axis == 0 else layer.weight.T
            step = np.repeat(grid.scale, grid.block_size, axis=0)[:w_kn.shape[0]]
            np.testing.assert_array_equal(dequantize(quantize(w_kn, step, 0, grid.low, grid.qmax), step, 0), w_kn)
            continue
        assert np.abs(codes[name]).max() <= layer.grid.qmax
        # the plan's float weight is exactly codes × scale: emission divides it back without loss
        np.testing.assert_array_equal(weight_codes(layer), codes[name])
        np.testing.assert_array_equal(layer.weight, dequantize(codes[name], broadcast_channel(
            layer.grid.scale, layer.grid.axis, layer.weight.ndim), 0))
        rows = reduction_rows(codes[name], layer.op_type, layer.grid.axis)
        assert rows is None or pairs_fit(rows).all(), f"{name}: int16-pair safety of the avx2 target"


def test_input_step_moves_only_for_a_sole_consumer(rng):
    """conv1 alone reads x; conv2's input is MaxPool's, tied to r1, which the residual Add also reads."""
    state = planned_cnn(rng, w_bits=8)
    movable = {name: movable_input_step(state, layer) for name, layer in state.plan.layers.items()}
    assert movable == {"conv1": True, "conv2": False, "fc": True}
    before = {name: state.plan.act_params(layer.input_name) for name, layer in state.plan.layers.items()}
    AdaQuantPass(iterations=100).run(state)
    after = {name: state.plan.act_params(layer.input_name) for name, layer in state.plan.layers.items()}
    assert after["conv2"] == before["conv2"]
    assert all(after[n][1] == before[n][1] for n in after), "zero points stay"


def test_weights_stay_where_rows_cannot_pin_them(rng):
    """fc reads K = 8 inputs per channel: 15 rows fit its steps and bias only, 16 rows its weights too."""
    state = planned_cnn(rng, w_bits=8)
    fc = state.plan.layers["fc"]
    io = layer_io(next(n for n in state.model.graph if n.name == "fc"), fc)
    for count, weights in ((15, False), (16, True)):
        p = layer_problem(state, fc, io, rng.standard_normal((count, 10)).astype(np.float32))
        assert p.learning()["v"] is weights and p.learning()["w_scale"] and p.learning()["bias"]


def test_loss_is_taken_after_the_absorbed_activation(rng):
    state = planned_cnn(rng)
    assert [output_bound(state, l) for l in state.plan.layers.values()] == [(0.0, np.inf), (0.0, 6.0), None]


def test_quantized_and_fp32_captures_pick_the_same_rows(rng):
    """Sequential mode pairs inputs from the QDQ model with fp32 targets: the row picks must agree
    (conv1 reads the graph input, so its rows are identical from both models)."""
    state = planned_cnn(rng)
    layers = list(state.plan.layers.values())
    fp32 = capture(state, layers, Keep, max_rows=50)
    quant = capture(state, layers, Keep, max_rows=50, source=emit_model(state.model, state.plan))
    np.testing.assert_array_equal(fp32["conv1"].x, quant["conv1"].x)
    assert not np.allclose(fp32["conv2"].x, quant["conv2"].x), "conv2 sees the quantized prefix"
    assert fp32["conv2"].x.shape == quant["conv2"].x.shape


def test_sequential_rows_are_read_before_the_input_quantizer(rng):
    """At 4-bit activations an absorbed Relu drops out and its output name is taken by the dequantized
    codes. Sequential mode must read the Relu's input x instead (the input step it fits re-quantizes
    x, not codes already on the old grid): x has the negative values the Relu would clip, and
    quantizing x on the grid gives exactly the codes the emitted model carries."""
    f = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["gp"], name="gap"),
             helper.make_node("Flatten", ["gp"], ["y"], name="flat")]
    model = make_model(nodes, [fvi("x", ["N", 3, 8, 8])], [fvi("y", ["N", 8])],
                       {"w1": f(8, 3, 3, 3), "b1": f(8), "w2": f(8, 8, 3, 3), "b2": f(8)})
    from test_corrections import planned
    state = planned(model, rng.standard_normal((16, 3, 8, 8)).astype(np.float32), w_bits=4, a_bits=4,
                    first_last_8bit=False)
    source = emit_model(state.model, state.plan)
    assert quantized_from(state.model, state.plan) == {"r1": "c1"}
    layer = [state.plan.layers["conv2"]]
    codes = capture(state, layer, Keep, max_rows=64, source=source)["conv2"].x
    pre = capture(state, layer, Keep, max_rows=64, source=source,
                  inputs_from=quantized_from(state.model, state.plan))["conv2"].x
    s, z = state.plan.act_params("r1")
    assert pre.min() < 0 <= codes.min()
    np.testing.assert_array_equal(quantize(pre, s, z, 0, 15), quantize(codes, s, z, 0, 15))
    np.testing.assert_allclose(codes, dequantize(quantize(pre, s, z, 0, 15), s, z), rtol=0, atol=1e-6)


class Keep:
    """Accumulator keeping all captured rows: x [G, R, K], and y [R, M] with the fp32 bias added back."""

    def __init__(self, io=None):
        self.bias = 0.0 if io is None or io.bias is None else io.bias

    def update(self, x, y, weight=1.0):
        self.x = np.concatenate([self.x, x], axis=1) if hasattr(self, "x") else x
        self.y = np.concatenate([self.y, y + self.bias]) if hasattr(self, "y") else y + self.bias


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_compile_is_deterministic(rng, mode):
    model, x = cnn(rng, bn=True), rng.standard_normal((40, 3, 16, 16)).astype(np.float32)
    spec = f"adaquant:mode={mode}:iterations=50"
    one = onnxptq.compile(model, {"x": x}, pipeline=spec, w_bits=4, seed=3).model.SerializeToString()
    two = onnxptq.compile(model, {"x": x}, pipeline=spec, w_bits=4, seed=3).model.SerializeToString()
    assert one == two


def test_worker_processes_give_the_same_model(rng):
    """Independent layers are fitted in worker processes: the same graph as in-process (the metadata
    differ: they echo the pipeline spec), and not the graph of round-to-nearest."""
    model, x = cnn(rng, bn=True), rng.standard_normal((40, 3, 16, 16)).astype(np.float32)
    rtn, one, two = (onnxptq.compile(model, {"x": x}, pipeline=spec, w_bits=4).model.graph.SerializeToString()
                     for spec in ("calibration", "adaquant:mode=parallel:iterations=30:workers=1",
                                  "adaquant:mode=parallel:iterations=30:workers=2"))
    assert one == two != rtn


def test_advanced_pipeline_runs_adaquant_then_bn_reestimation_and_bias_tuning():
    names = [p.name for p in pipelines.build("advanced", PIPELINE)]
    at = names.index("adaquant")
    assert names[at:at + 3] == ["adaquant", "bn-reestimate", "bias-tuning"]
    aq = pipelines.build("adaquant:mode=sequential:iterations=7:lr_w=0.5", PIPELINE)[at]
    assert (aq.mode, aq.iterations, aq.lr_w) == ("sequential", 7, 0.5)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("stem_bits", [4, 8])
def test_adaquant_lowers_the_error_of_real_layers(stem_bits):
    """EfficientNet-Lite0 at W4A8: the stem, a depthwise and a pointwise conv. Each layer's output error
    on its captured rows, recomputed from the plan alone (ONNX-exact fake quantization of the input,
    the plan's weights on their grid and bias, the Relu6 on both sides), drops well below round-to-nearest's.
    With the stem at 8 bits (first/last layers kept at 8) on AVX2 its pair-safe floor re-rounds the fit:
    what is written must still not be worse than round-to-nearest."""
    import copy
    import importlib

    from onnxptq.data import load_calibration
    from onnxptq.kernels.quant import channel_rows, fake_quantize
    from onnxptq.model_io import load_model, to_ir
    from onnxptq.state import CompileOptions, CompileState, run_passes

    ex = importlib.import_module("examples.efficientnet_lite0.example")
    source = load_model(ex.fp32_model())
    state = CompileState(source=source, model=to_ir(source), options=CompileOptions(w_bits=4, first_last_8bit=stem_bits == 8, target="ort-cpu-avx2"),
                         calib=load_calibration(ex.calibration_set(16), source, None), holdout=None)
    core = pipelines.build("calibration", PIPELINE)
    run_passes(state, core[:[p.name for p in core].index("emission")])
    names = ["stem.conv", "blocks.1.depthwise.conv", "blocks.2.project.conv"]
    state.plan.layers = {name: state.plan.layers[name] for name in names}
    rtn = copy.deepcopy(state.plan)
    rows = capture(state, list(state.plan.layers.values()), Keep, max_rows=512)

    def error(plan, name):
        layer, x = plan.layers[name], rows[name].x
        s, z = plan.act_params(layer.input_name)
        scale = broadcast_channel(layer.grid.scale, 0, layer.weight.ndim)
        w = channel_rows(dequantize(weight_codes(layer), scale, 0), 0)  # what emission writes
        g = x.shape[0]
        out = np.matmul(fake_quantize(x, s, z, 0, 255), w.reshape(g, -1, w.shape[1]).transpose(0, 2, 1))
        out = out.transpose(1, 0, 2).reshape(-1, w.shape[0]) + layer.bias
        bound = output_bound(state, layer) or (-np.inf, np.inf)
        return float(np.mean((np.clip(out, *bound) - np.clip(rows[name].y, *bound)) ** 2))

    AdaQuantPass(mode="parallel", iterations=60).run(state)  # fitted on the fp32 rows measured here
    for name in names:
        if state.plan.layers[name].grid.bits == 8:
            assert error(state.plan, name) <= error(rtn, name), name
        else:
            assert error(state.plan, name) < 0.8 * error(rtn, name), name
    assert state.plan.layers["stem.conv"].grid.bits == stem_bits
