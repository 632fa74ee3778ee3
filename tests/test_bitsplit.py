"""BitSplit: the solver kernel against planted and brute-force optima, im2col against a direct
convolution, the captured statistics against onnxruntime, and the pass end to end."""

import itertools

import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

import onnxptq
from conftest import cnn, fvi, make_model
from onnxptq.capture import response_stats
from onnxptq.cli import main
from onnxptq.data import load_calibration
from onnxptq.errors import InputError
from onnxptq.kernels.bitsplit import _descend, _Problem, fit_scales, solve, split_planes, stitch
from onnxptq.kernels.im2col import channels_last_rows, conv_output_shape, conv_pads, im2col
from onnxptq.kernels.quant import channel_rows, fake_quantize, quantize, row_scales
from onnxptq.kernels.response import ResponseStats
from onnxptq.model_io import to_ir
from onnxptq.passes.bitsplit import BitSplitPass, layer_statistics
from onnxptq.passes.emission import emit_model
from onnxptq.passes.layer_moments import outputs_named
from onnxptq.passes.calibration import CalibrationPass
from onnxptq.passes.fusion import FusionPass
from onnxptq.passes.select import SelectPass
from onnxptq.passes.weights import WeightGridPass
from onnxptq.runtime import session
from onnxptq.state import CompileOptions, CompileState


def layer_problem(rng, c, k, n=400, groups=1, noise=0.0):
    """Stats of a random layer with post-Relu-like inputs, its weights [C, K] and its rows; ``noise``
    adds a part of the target no weight can fit."""
    x = np.maximum(rng.standard_normal((groups, n, k)) * rng.uniform(0.2, 2.0, k), 0)
    w = rng.standard_normal((c, k)) * rng.uniform(0.5, 1.5, (c, 1))
    y = np.concatenate([x[g] @ w.reshape(groups, -1, k)[g].T for g in range(groups)], axis=1)
    y += noise * y.std() * rng.standard_normal(y.shape)
    stats = ResponseStats(groups, k, c)
    stats.update(x, y)
    return stats, w, x, y


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_planes_stitch_back(rng, bits):
    qmax = 2 ** (bits - 1) - 1
    q = rng.integers(-qmax, qmax + 1, (5, 40))
    planes = split_planes(q, bits)
    assert planes.shape == (bits - 1, 5, 40) and set(np.unique(planes)) <= {-1, 0, 1}
    np.testing.assert_array_equal(stitch(planes, bits), q)


def test_response_stats_stream_and_objective(rng):
    stats, w, x, y = layer_problem(rng, 6, 10, n=300, groups=2)
    halves = ResponseStats(2, 10, 6)
    halves.update(x[:, :100], y[:100])
    halves.update(x[:, 100:], y[100:])
    np.testing.assert_allclose(halves.gram, stats.gram, rtol=1e-12)
    np.testing.assert_allclose(halves.xty, stats.xty, rtol=1e-12)
    v = w + rng.standard_normal(w.shape) * 0.1
    direct = [((y[:, c] - x[c // 3] @ v[c]) ** 2).sum() for c in range(6)]
    np.testing.assert_allclose(stats.objective(v), direct, rtol=1e-9)
    shift = stats.bias_shift(v)
    np.testing.assert_allclose(shift, [(y[:, c] - x[c // 3] @ v[c]).mean() for c in range(6)], rtol=1e-9)
    after_shift = [((y[:, c] - x[c // 3] @ v[c] - shift[c]) ** 2).sum() for c in range(6)]
    np.testing.assert_allclose(stats.centered().objective(v), after_shift, rtol=1e-9)
    beta = rng.standard_normal(6)
    shifted = [((y[:, c] - x[c // 3] @ v[c] - beta[c]) ** 2).sum() for c in range(6)]
    np.testing.assert_allclose(stats.objective(v, beta), shifted, rtol=1e-9)


def test_ridge_adds_the_weight_error_at_the_inputs_mean_energy(rng):
    stats, w, x, y = layer_problem(rng, 6, 10, n=300, groups=2)
    v = w + rng.standard_normal(w.shape) * 0.1
    energy = [np.mean(x[g] ** 2) * x.shape[1] for g in range(2)]  # tr(A_g)/K: Σ_rows ‖x‖² / K
    for lam in (0.0, 0.5, 2.0):
        expected = [((y[:, c] - x[c // 3] @ v[c]) ** 2).sum() + lam * energy[c // 3] * ((w[c] - v[c]) ** 2).sum()
                    for c in range(6)]
        np.testing.assert_allclose(stats.ridge(w, lam).objective(v), expected, rtol=1e-9)
    centered = stats.centered()  # at ŵ = w the weight term vanishes
    np.testing.assert_allclose(centered.ridge(w, 1.0).objective(w), centered.objective(w), atol=1e-9 * stats.yy.sum())


def test_weight_space_stats(rng):
    w, v = rng.standard_normal((2, 6, 5))
    stats = ResponseStats.weight_space(w, groups=2)
    np.testing.assert_allclose(stats.objective(v), ((w - v) ** 2).sum(axis=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits,groups,block", [(2, 1, None), (3, 1, None), (4, 1, None), (4, 4, None), (4, 1, 8)])
def test_steps_never_increase_objective_and_codes_stay_in_range(rng, bits, groups, block):
    stats, w, _, _ = layer_problem(rng, 8, 20, groups=groups)
    qmax = 2 ** (bits - 1) - 1
    rows = w if block is None else np.pad(w, [(0, 0), (0, 4)]).reshape(-1, block)  # K = 20: a partial block
    scale = row_scales(rows.astype(np.float32), qmax, "mse").reshape(8, -1)
    result = solve(stats, w, bits, scale, block)
    steps = np.diff(result.history)
    assert (steps <= 1e-12 * result.history[0]).all(), "an α or plane step increased the objective"
    assert np.all(result.objective <= result.rtn * (1 + 1e-12)), "no channel ends worse than round-to-nearest"
    assert result.codes.dtype.kind == "i" and np.abs(result.codes).max() <= qmax
    assert (result.scale > 0).all() and result.scale.shape == (8, 1 if block is None else 3)
    entry = np.repeat(result.scale, block or 20, axis=1)[:, :20]
    np.testing.assert_allclose(stats.objective(entry * result.codes), result.objective, rtol=1e-9, atol=1e-9)


def test_8_bits_runs(rng):
    stats, w, _, _ = layer_problem(rng, 4, 12)
    result = solve(stats, w, 8, row_scales(w.astype(np.float32), 127, "mse"), max_iter=3)
    assert np.abs(result.codes).max() <= 127 and result.objective.sum() <= result.rtn.sum()


def planted(rng, bits, c=6, k=24, n=2000):
    """Correlated inputs X, codes q (each channel with a ±1 code, which pins its scale: otherwise
    2α·(q/2) would be the same weight), scales α, and the stats of Y = X·(α ⊙ q)ᵀ."""
    qmax = 2 ** (bits - 1) - 1
    q = rng.integers(-qmax, qmax + 1, (c, k))
    q[:, 0] = 1
    alpha = rng.uniform(0.5, 2.0, c)
    x = rng.standard_normal((1, n, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    stats = ResponseStats(1, k, c)
    stats.update(x, x[0] @ (alpha[:, None] * q).T)
    return q, alpha, stats


def assert_recovered(result, q, alpha, stats):
    assert result.objective.sum() <= 1e-12 * stats.yy.sum()
    np.testing.assert_array_equal(result.codes, q)
    # the objective bound pins α to a relative √1e-12; the solver may stop at a float32 start within it
    np.testing.assert_allclose(result.scale[:, 0], alpha, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_planted_codes_recovered(rng, bits):
    q, alpha, stats = planted(rng, bits)
    w = alpha[:, None] * q
    result = solve(stats, w, bits, row_scales(w.astype(np.float32), 2 ** (bits - 1) - 1, "mse"))
    assert_recovered(result, q, alpha, stats)


def test_planted_ternary_codes_recovered_from_the_response_alone(rng):
    """2 bits (one plane): handed perturbed weights whose rounding is wrong, the exact ternary
    coordinate descent on the response finds the planted codes. (With 3–4 bits the plane-wise descent
    can stall in a local optimum from such a start: measured on 20 trials of 6 channels, all channels
    recovered in 10/20 at 3 bits and 5/20 at 4 bits, the rest within 0.05% of ‖Y‖².)"""
    q, alpha, stats = planted(rng, 2)
    noisy = alpha[:, None] * (q + rng.uniform(-0.45, 0.45, q.shape) * (q == 0))
    noisy[:, 1] += alpha * 0.6 * (q[:, 1] == 0)  # a zero code that rounds to ±1
    noisy[:, 2] -= alpha * 0.6 * (q[:, 2] == 1)  # a one that rounds to zero
    result = solve(stats, noisy, 2, row_scales(noisy.astype(np.float32), 1, "mse"), max_iter=50, tol=0)
    assert result.rtn.sum() > 1e-3 * stats.yy.sum(), "rounding alone should be wrong here"
    assert_recovered(result, q, alpha, stats)


def brute_force(stats, c, qmax):
    """min over all codes q ∈ [−Q, Q]^K with the best real α of ‖y_c − α·Xq‖² = ‖y‖² − (qᵀb)²/(qᵀAq)."""
    k = stats.gram.shape[1]
    q = np.array(list(itertools.product(range(-qmax, qmax + 1), repeat=k)), np.float64)
    num = (q @ stats.xty[c]) ** 2
    den = np.einsum("nk,kl,nl->n", q, stats.gram[0], q)
    return stats.yy[c] - np.where(den > 0, num / np.maximum(den, 1e-300), 0.0).max()


@pytest.mark.parametrize("bits,k", [(2, 6), (3, 5)])
def test_against_brute_force_on_tiny_layers(rng, bits, k):
    """Coordinate descent over planes and α is a local method. Measured on 200 tiny noisy layers per
    setting: it finds the global optimum on 69% (2 bits, K = 6) and 48% (3 bits, K = 5), the 90th
    percentile of its excess error is 15% / 11% of the optimum's, the worst 2.4× / 0.44×; round-to-
    nearest finds the optimum on none (median excess 17% / 9%). Here: 20 layers, optimum on ≥ 40%."""
    qmax = 2 ** (bits - 1) - 1
    found = []
    for _ in range(20):
        stats, w, _, _ = layer_problem(rng, 1, k, n=60, noise=0.5)
        result = solve(stats, w, bits, row_scales(w.astype(np.float32), qmax, "mse"), max_iter=100, tol=0)
        best = brute_force(stats, 0, qmax)
        assert best <= result.objective[0] * (1 + 1e-9) <= result.rtn[0] * (1 + 1e-9)
        found.append(result.objective[0] <= best * (1 + 1e-9))
    assert np.mean(found) >= 0.4, found


def direct_conv(x, w, strides, dilations, pads, groups):
    """Reference convolution: one shifted, strided slice of the padded input per kernel tap."""
    rank = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    out = conv_output_shape(x.shape[2:], w.shape[2:], strides, dilations, pads)
    m, cg = w.shape[:2]
    y = np.zeros((x.shape[0], m, *out))
    for tap in itertools.product(*(range(k) for k in w.shape[2:])):
        sl = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dilations, out, strides))
        patch = xp[(slice(None), slice(None)) + sl]  # [N, C, *out]
        for g in range(groups):
            wg = w[g * (m // groups):(g + 1) * (m // groups), :, *tap]  # [M/G, C/G]
            y[:, g * (m // groups):(g + 1) * (m // groups)] += np.einsum(
                "mc,nc...->nm...", wg, patch[:, g * cg:(g + 1) * cg])
    return y


@pytest.mark.parametrize("shape,kernel,strides,dilations,pads,groups", [
    ((2, 4, 9, 8), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1),
    ((2, 4, 9, 8), (3, 2), (2, 1), (1, 2), (0, 1, 2, 0), 2),
    ((1, 6, 7, 7), (5, 5), (2, 2), (1, 1), (1, 1, 2, 2), 6),   # depthwise, TF-style asymmetric pads
    ((3, 4, 11), (3,), (2,), (2,), (1, 0), 1),                  # 1-D
])
def test_im2col_matches_direct_convolution(rng, shape, kernel, strides, dilations, pads, groups):
    x = rng.standard_normal(shape)
    m = 2 * groups
    w = rng.standard_normal((m, shape[1] // groups, *kernel))
    cols = im2col(x, kernel, strides, dilations, pads, groups)
    w_g = w.reshape(groups, m // groups, -1)
    y_rows = np.concatenate([cols[g] @ w_g[g].T for g in range(groups)], axis=1)
    ref = direct_conv(x, w, strides, dilations, pads, groups)
    np.testing.assert_allclose(y_rows, channels_last_rows(ref), atol=1e-10)
    some = np.array([5, 0, 3])
    np.testing.assert_array_equal(im2col(x, kernel, strides, dilations, pads, groups, some), cols[:, some])


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_matches_onnx_reference(rng, auto_pad):
    x = rng.standard_normal((1, 2, 8, 7)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, strides=[2, 3])
    ref = ReferenceEvaluator(node).run(None, {"x": x, "w": w})[0]
    pads = conv_pads(x.shape[2:], (3, 2), (2, 3), (1, 1), None, auto_pad)
    cols = im2col(x, (3, 2), (2, 3), (1, 1), pads)
    np.testing.assert_allclose(cols[0] @ w.reshape(3, -1).T, channels_last_rows(ref), rtol=1e-5, atol=1e-5)


def planned_state(model, x, **options):
    state = CompileState(source=model, model=to_ir(model), options=CompileOptions(**options),
                         calib=load_calibration({"x": x}, model), holdout=None)
    for p in (FusionPass(), SelectPass(), CalibrationPass(), WeightGridPass()):
        p.run(state)
    return state


def test_captured_statistics_match_the_layers(rng):
    """With fp32 inputs Y = X·Wᵀ exactly, so XᵀY = A·Wᵀ: checks the patches against onnxruntime's Conv,
    the Gemm rows and the bias removal; a small row cap exercises the subsampling."""
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    state = planned_state(cnn(rng), x, w_bits=4, batch_size=5, first_last_8bit=False)
    layers = list(state.plan.layers.values())
    stats = response_stats(state, layers, max_rows=300)
    for layer in layers:
        st = stats[layer.node]
        w = channel_rows(layer.weight, layer.weight_channel_axis).astype(np.float64)
        expected = (w @ st.gram[0])
        np.testing.assert_allclose(st.xty, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert stats["conv1"].rows == pytest.approx(12 * 16 * 16) and stats["fc"].rows == 12


def feature_cnn(rng, width=16):
    """Conv→Relu ×3 (the middle one strided), output the last feature map: no pooling to average the
    weight errors away, so the output measures them."""
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w1": f(width, 3, 3, 3), "b1": f(width), "w2": f(width, width, 3, 3), "b2": f(width),
             "w3": f(width, width, 3, 3), "b3": f(width)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["y"], name="relu3")]
    return make_model(nodes, [fvi("x", ["N", 3, 16, 16])], [fvi("y", ["N", width, 8, 8])], inits)


def smooth_images(rng, n):
    """Blurred noise with correlated colour channels, so the entries of a patch correlate as in photos."""
    x = rng.standard_normal((n, 3, 18, 18))
    x = (x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]) / 3
    x = (x[:, :, :, :-2] + x[:, :, :, 1:-1] + x[:, :, :, 2:]) / 3
    return (x + 0.5 * x.mean(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("bits,solver", [(4, "bitsplit"), (3, "bitsplit"), (2, "bitsplit"), (2, "bitsplit-sequential")])
def test_compile_bitsplit_beats_round_to_nearest(rng, bits, solver):
    """Output SQNR vs fp32 on 100 unseen images (measured over seeds 0–3 in parallel mode, before the
    sequential mode existed: BitSplit +3 to +7 dB)."""
    model = feature_cnn(rng)
    calib, test = smooth_images(rng, 40), smooth_images(rng, 100)
    ref = session(model).run(None, {"x": test})[0]
    sqnr = {}
    for solver in ("rtn", solver):
        q = onnxptq.compile(model, {"x": calib}, w_bits=bits, weight_solver=solver, holdout=0,
                            first_last_8bit=False).model
        err = ref - session(q).run(None, {"x": test})[0]
        sqnr[solver] = 10 * np.log10((ref**2).sum() / (err**2).sum())
    assert sqnr[solver] >= sqnr["rtn"] + 1, sqnr


def test_report_rows_and_fits(rng):
    """Every 2–4-bit layer is solved and reported; the classifier (one row per sample, fewer than two
    per weight) is fitted in weight space, layers with a bias with their best bias shift."""
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    report = onnxptq.compile(cnn(rng), {"x": x}, w_bits=3, weight_solver="bitsplit", first_last_8bit=False).report
    entry = next(p for p in report["passes"] if p["name"] == "bitsplit")
    fits = {row["node"]: row["fit"] for row in entry["layers"]}
    assert fits == {"conv1": "centered response", "conv2": "centered response", "fc": "weights"}
    assert all(row["vs_rtn"] <= 1 and row["bits"] == 3 for row in entry["layers"])
    assert "response error vs round-to-nearest" in entry["notes"][0]


def test_bad_solver_and_bits(rng):
    model = cnn(rng)
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    with pytest.raises(InputError, match="--weight-solver"):
        onnxptq.compile(model, {"x": x}, weight_solver="adaround")
    with pytest.raises(InputError, match="--w-bits 5"):
        onnxptq.compile(model, {"x": x}, w_bits=5)


def test_cli_weight_solver(cnn_files, tmp_path, capsys):
    model, calib = cnn_files
    out = tmp_path / "q.onnx"
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(out), "--w-bits", "2",
                 "--weight-solver", "bitsplit", "-q"]) == 0 and out.exists()
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "r.onnx"),
                 "--weight-solver", "gptq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--weight-solver" in err[0]


def test_blocked_int4_matmul(rng):
    """4-bit MatMul weights are int4 blocked along K (MatMulNBits); BitSplit fits one scale per
    (block, column), K = 80 giving two full blocks and a partial one."""
    w = (rng.standard_normal((80, 24)) / 9).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [fvi("x", ["N", 8, 80])], [fvi("y", ["N", 8, 24])], {"w": w})
    mix = rng.standard_normal((80, 80)) / 9 + np.eye(80)
    calib, test = ((rng.standard_normal((n, 8, 80)) @ mix).astype(np.float32) for n in (40, 50))
    ref = test @ w
    sqnr = {}
    for solver in ("rtn", "bitsplit"):
        result = onnxptq.compile(model, {"x": calib}, w_bits=4, weight_solver=solver, holdout=0,
                                 first_last_8bit=False, target="ort-cpu-size")
        err = ref - session(result.model).run(None, {"x": test})[0]
        sqnr[solver] = 10 * np.log10((ref**2).sum() / (err**2).sum())
    row = next(p for p in result.report["passes"] if p["name"] == "bitsplit")["layers"][0]
    assert row["fit"] == "response" and row["k"] == 80 and row["vs_rtn"] < 1
    assert result.report["verification"]["coverage"] == 1.0
    assert sqnr["bitsplit"] >= sqnr["rtn"] + 1, sqnr


def test_written_layer_is_checked_against_round_to_nearest(rng):
    """A bias far above what the weights can move (3e4 against weights of 1e-3) floors the weight
    scale at |b|/(s_x·2³⁰) to keep the int32 bias representable. BitSplit's fitted scale lies below
    that floor, and raising it with the codes kept makes the written weights several times the fitted
    ones (measured: response error 1.03·‖Y‖² as written against 0.43 for round-to-nearest, 0.16 for the
    fit before the floor). The check measures the layer as written and puts round-to-nearest back; the
    errors here are recomputed from the calibration patches, independently of the pass's statistics."""
    w = (rng.standard_normal((4, 3, 3, 3)) * 1e-3).astype(np.float32)
    b = np.full(4, 3e4, np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                       [fvi("x", ["N", 3, 16, 16])], [fvi("y", ["N", 4, 16, 16])], {"w": w, "b": b})
    x = smooth_images(rng, 12)
    state = planned_state(model, x, w_bits=2, first_last_8bit=False, weight_solver="bitsplit")
    layer = state.plan.layers["conv"]
    patches = im2col(x.astype(np.float64), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))[0]
    target = patches @ w.reshape(4, -1).T.astype(np.float64) + b

    def error() -> float:
        out = patches @ layer.dequantized().reshape(4, -1).T.astype(np.float64) + layer.bias
        return float(((out - target) ** 2).sum())

    rtn = error()
    BitSplitPass().run(state)
    row = next(p for p in state.report.passes if p["name"] == "bitsplit")["layers"][0]
    assert row["solver_vs_rtn"] < 0.5, "the fit itself beats round-to-nearest before the floor"
    assert error() <= rtn * (1 + 1e-9), "the written layer must not be worse than round-to-nearest"
    assert not row["kept"] and row["written_error"] > 2 * row["rtn_error"]


def test_sequential_statistics_see_the_written_prefix(rng):
    """In sequential mode a layer's X rows come from the QDQ model of the plan as it stands when its
    level is reached (the layers before it already written), fake-quantized on its input grid, and its
    targets Y from the fp32 model: recomputed here from onnxruntime's tensors and numpy im2col."""
    model = feature_cnn(rng)
    x = smooth_images(rng, 16)
    state = planned_state(model, x, w_bits=2, first_last_8bit=False, weight_solver="bitsplit")
    layers = [state.plan.layers[n] for n in ("conv1", "conv2")]
    stream = layer_statistics(state, layers, "sequential")
    first, _ = next(stream)
    first.weight = first.weight * 0.5  # a change to the prefix the next level must see
    second, stats = next(stream)
    assert second.node == "conv2"
    r1 = session(outputs_named(emit_model(state.model, state.plan), ["r1"]), level="basic").run(None, {"x": x})[0]
    scale, zero = state.plan.act_params("r1")
    r1 = fake_quantize(r1, scale, zero, 0, 255).astype(np.float64)
    fp32_r1 = session(outputs_named(to_ir(model), ["r1"])).run(None, {"x": x})[0].astype(np.float64)
    cols = im2col(r1, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    w2 = channel_rows(second.weight, 0).astype(np.float64)
    y = im2col(fp32_r1, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))[0] @ w2.T
    expected = ResponseStats(1, cols.shape[2], 16)
    expected.update(cols, y)
    np.testing.assert_allclose(stats.gram, expected.gram, rtol=1e-5, atol=1e-6 * np.abs(expected.gram).max())
    np.testing.assert_allclose(stats.xty, expected.xty, rtol=1e-4, atol=1e-5 * np.abs(expected.xty).max())
    assert stats.rows == expected.rows


@pytest.mark.parametrize("solver,pipeline", [("bitsplit-sequential", "calibration"), ("bitsplit", "calibration"),
                                             ("bitsplit", "light")])
def test_layers_that_raise_the_models_output_error_are_put_back(rng, harmful_bitsplit, solver, pipeline):
    """Both modes check the written layers at the model's outputs (sequential: each level on the model;
    parallel: each layer's ΔL against round-to-nearest's, re-standardized where the light pipeline's
    BN re-estimation will). Solutions made harmful on purpose (the codes' signs flipped) and let
    through the per-layer check are all put back: the compiled model is round-to-nearest's, and each
    row says so."""
    model, x = feature_cnn(rng), smooth_images(rng, 24)
    options = dict(w_bits=2, first_last_8bit=False, pipeline=pipeline, holdout=0, pass_effects=False)
    rtn = onnxptq.compile(model, {"x": x}, **options).model
    harmful_bitsplit()
    result = onnxptq.compile(model, {"x": x}, weight_solver=solver, **options)
    rows = next(p for p in result.report["passes"] if p["name"] == "bitsplit")["layers"]
    assert [(r["node"], r["kept"], r.get("reverted")) for r in rows] == [
        ("conv1", False, True), ("conv2", False, True), ("conv3", False, True)]
    if solver == "bitsplit":
        assert all(r["output_loss"] > r["output_loss_rtn"] > 0 for r in rows)
    assert result.model.graph.SerializeToString() == rtn.graph.SerializeToString()


def test_a_fit_put_back_is_solved_again_at_other_ridge_strengths(rng, monkeypatch):
    """Parallel mode: a layer whose fit at the default weight term moves the outputs no less than
    round-to-nearest is solved again at each of ``RETRY_RIDGES``; of those, the one of lowest ΔL below
    round-to-nearest's stays (its report row, with its ridge), else round-to-nearest goes back. The fits
    at the default are made harmful on purpose (signs flipped, let through the response check), the
    second tries are the solver's own."""
    import onnxptq.passes.bitsplit as bitsplit_pass

    objective, solve_kernel, prefer = bitsplit_pass._objective, bitsplit_pass.solve, bitsplit_pass.outputs_prefer_fit
    ridges, compared = [], []

    def recording_objective(layer, stats, w, ridge):
        ridges.append(ridge)
        return objective(layer, stats, w, ridge)

    def flipped_at_default(*args, **kwargs):
        result = solve_kernel(*args, **kwargs)
        if ridges[-1] == bitsplit_pass.RIDGE:
            result.codes = -result.codes
        return result

    def always(state, layer, write, loss, before=None):
        write()
        return bitsplit_pass.Checked(1.0, 0.5, True)

    def recording_prefer(fit, rtn):
        compared.append((fit, rtn))
        return prefer(fit, rtn)

    model, x = feature_cnn(rng), smooth_images(rng, 24)
    options = dict(w_bits=2, first_last_8bit=False, pipeline="light", holdout=0, pass_effects=False)
    rtn = onnxptq.compile(model, {"x": x}, **options).model
    for name, patch in [("_objective", recording_objective), ("solve", flipped_at_default),
                        ("write_if_better", always), ("outputs_prefer_fit", recording_prefer)]:
        monkeypatch.setattr(bitsplit_pass, name, patch)
    result = onnxptq.compile(model, {"x": x}, weight_solver="bitsplit", **options)
    rows = next(p for p in result.report["passes"] if p["name"] == "bitsplit")["layers"]
    retries = list(bitsplit_pass.RETRY_RIDGES)
    assert ridges == [bitsplit_pass.RIDGE] * 3 + retries * 3
    kept = 0
    for i, row in enumerate(rows):  # per layer: the default's comparison, then one per second try
        first, *again = compared[i * (1 + len(retries)):(i + 1) * (1 + len(retries))]
        assert first[1] == row["output_loss_rtn"] <= first[0]
        below = [(fit, ridge) for (fit, _), ridge in zip(again, retries) if fit < row["output_loss_rtn"]]
        if below:
            kept += 1
            assert (row["kept"], row.get("reverted")) == (True, None)
            assert (row["output_loss"], row["ridge"]) == min(below)
        else:
            assert (row["kept"], row["reverted"]) == (False, True)
    assert kept > 0
    assert (result.model.graph.SerializeToString() == rtn.graph.SerializeToString()) == (kept == 0)


def test_each_channel_keeps_the_best_of_its_starts(rng):
    """Handed a grid clipped deep into every channel (r = 0.3 of max|w|, as the 2-bit MSE search can
    pick), each channel ends at the best of the descents from round-to-nearest on that grid and from
    the weight-space fixed points of that grid and of the min-max grid — and those descents do end
    apart, so no single start would do."""
    stats, w, _, _ = layer_problem(rng, 16, 20, n=200, noise=0.5)
    deep = 0.3 * np.abs(w).max(axis=1, keepdims=True)
    result = solve(stats, w, 2, deep)
    rtn = quantize(w, deep, 0, -1, 1)
    starts = [(rtn, deep[:, 0])] + [fit_scales(w, s, 1) for s in (deep[:, 0], np.abs(w).max(axis=1))]
    ends = []
    for codes, alpha in starts:
        run = _Problem(stats, split_planes(codes, 2), alpha.reshape(-1, 1).copy(), 2, 20)
        _descend(run, 2, 30, 1e-5)
        ends.append(run.f)
    ends = np.stack(ends)
    np.testing.assert_allclose(result.objective, ends.min(axis=0), rtol=1e-12)
    assert (ends.min(axis=0) < ends[np.argmin(ends.sum(axis=1))] * (1 - 1e-9)).any(), "the starts never differ"
