"""AdaQuant's onnxruntime-training engine (onnxptq/training) against the numpy engine: the layer graph's
loss is the numpy objective (stock onnxruntime, always run); on a fixed seed both engines give the same
loss curve (``training``: run in the training environment, skipped without it); a missing environment
is one line of error."""

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxptq import pipelines
from onnxptq.errors import InputError
from onnxptq.kernels.adaquant import LEARNING_RATES, Fit, LayerProblem, Settings, fit, loss_and_grad
from onnxptq.passes.adaquant import AdaQuantPass
from onnxptq.training import engine
from onnxptq.training.layer_graph import LayerOp, layer_model, theta_of
from test_adaquant import conv_problem, planned_cnn, problem
from test_bad_input import assert_bad, run_cli


def _has_training_environment() -> bool:
    try:
        engine.training_python()
    except InputError:
        return False
    return True


requires_training = pytest.mark.skipif(not _has_training_environment(), reason=(
    "no onnxruntime-training environment: `make .venv-training/.installed` (CI: `make test-training`)"))


def f32(p: LayerProblem) -> LayerProblem:
    """The problem in float32, as the pass builds it (both engines then compute in float32)."""
    return dataclasses.replace(p, **{f.name: getattr(p, f.name).astype(np.float32) for f in dataclasses.fields(p)
                                     if isinstance(getattr(p, f.name), np.ndarray)})


def conv_case(seed, c, m, groups, k, strides, dilations, pad, bound=None):
    p, x, y = conv_problem(np.random.default_rng(seed), c, m, groups, k, strides, dilations, pad, bound=bound)
    return f32(p), LayerOp("Conv", (k, k)), x.astype(np.float32), y.astype(np.float32)


def matrix_case(seed, op_type, block=None, x_step=True, scale=1.0):
    """A Gemm/MatMul layer on 98 rows of 24 inputs; ``scale`` shrinks weights and targets (and so
    every gradient) until Adam's ε dominates its steps."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 3, (1, 98, 24)).astype(np.float32)
    w = rng.standard_normal((10, 24)) * 0.3 * scale
    p = problem(rng, w, x_step=x_step, block=block)
    p = dataclasses.replace(p, bias=p.bias * scale, fp32_bias=p.fp32_bias * scale, bias_unit=p.bias_unit * scale)
    return f32(p), LayerOp(op_type), x, (x[0] @ w.T).astype(np.float32)


def weight_term_case(case):
    """``case`` with AdaQuant's weight term toward anchors off the starting weights."""
    p, op, x, y = case
    anchor = (p.weight * 1.05).astype(np.float32)
    return dataclasses.replace(p, weight_term=0.01, anchor=anchor), op, x, y


CASES = {
    "conv-stride2": lambda: conv_case(1, 4, 6, 1, 3, (2, 2), (1, 1), 1),
    "conv-grouped-dilated-clip": lambda: conv_case(2, 4, 6, 2, 3, (1, 1), (2, 2), 2, bound=(0, 6)),
    "conv-depthwise-relu": lambda: conv_case(3, 6, 6, 6, 3, (1, 1), (1, 1), 1, bound=(0, np.inf)),
    "gemm": lambda: matrix_case(4, "Gemm"),
    "gemm-tiny-gradients": lambda: matrix_case(5, "Gemm", scale=1e-4),
    "matmul-blocked-float-input": lambda: matrix_case(6, "MatMul", block=8, x_step=False),
    "gemm-weight-term": lambda: weight_term_case(matrix_case(7, "Gemm")),
}


@pytest.mark.parametrize("case", CASES)
def test_layer_graph_loss_is_the_numpy_objective(case):
    """The training graph's loss (stock onnxruntime) equals ``loss_and_grad``'s at parameters away
    from round-to-nearest, through the reparameterization θ = θ⁰ + λ·p′."""
    p, op, x, y = CASES[case]()
    model, trained = layer_model(p, op, LEARNING_RATES)
    assert model.ir_version <= 10 and trained == [n for n, on in p.learning().items() if on]
    rng = np.random.default_rng(0)
    values = {}
    for init in model.graph.initializer:
        if init.name in trained:
            values[init.name] = (rng.standard_normal(numpy_helper.to_array(init).shape) * 20).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    loss = session.run(None, {"x": op.rows_to_input(x), "y": y})[0]
    theta = theta_of(values, p, LEARNING_RATES)
    assert theta["v"].std() > 0.05 and np.abs(theta["w_scale"] - 1).max() > 0.01  # really moved
    np.testing.assert_allclose(loss, loss_and_grad(p, theta, x, y, grad=False)[0], rtol=2e-6)


def test_missing_training_environment_is_one_line(monkeypatch, tmp_path, cnn_files, capsys):
    monkeypatch.setenv(engine.PYTHON_VARIABLE, str(tmp_path / "none" / "python"))
    with pytest.raises(InputError, match=r"make \.venv-training/\.installed"):
        pipelines.correction_passes("adaquant:engine=ort-training", ())
    model, calib = cnn_files
    out = tmp_path / "q.onnx"
    assert_bad(*run_cli(["compile", model, "--calib", calib, "-o", out, "--pipeline", "adaquant:engine=ort-training"],
                        capsys), "onnxruntime-training", "ONNXPTQ_TRAINING_PYTHON")
    assert not out.exists()
    with pytest.raises(InputError, match="engine must be numpy or ort-training"):
        AdaQuantPass(engine="torch")


@pytest.fixture(scope="module")
def worker():
    with engine.TrainingWorker(engine.training_python()) as w:
        yield w


def both_engines(worker, case: tuple, tmp_path: Path, settings: Settings) -> tuple[Fit, Fit]:
    """The numpy engine's fit and the onnxruntime-training engine's, same rows, settings and seed."""
    p, op, x, y = case
    np.ascontiguousarray(x.transpose(1, 0, 2)).tofile(tmp_path / "x")
    y.tofile(tmp_path / "y")
    x_spec, y_spec = (str(tmp_path / "x"), (x.shape[1], x.shape[0], x.shape[2])), (str(tmp_path / "y"), y.shape)
    reference = fit(p, lambda i: (x[:, i], y[i]), len(y), settings, seed=7)
    return reference, worker.fit(p, op, x_spec, y_spec, settings, 7)[0]


def relative(a: list[float], b: list[float]) -> np.ndarray:
    return np.abs(np.subtract(a, b)) / np.abs(a)


@pytest.mark.training
@requires_training
@pytest.mark.parametrize("case", CASES)
def test_engines_agree_on_the_loss_curve_with_a_fixed_input_step(worker, case, tmp_path):
    """With the input step fixed, the two engines' 60-step loss curves agree to float32 rounding
    (measured ≤ 4.7e-6 relative, fitted losses ≤ 3.3e-6): same batches (``fit`` draws them for both), same Adam (β's, bias
    correction, ε added to √v̂ — the ``gemm-tiny-gradients`` case has gradients ~1e-9, where ε = 1e-8
    sets the step size, so a different ε or ε placement changes its curve by percents), same per-group
    rates. Exact equality is impossible: onnxruntime's Adam computes 1 − β and the bias corrections in
    float32 (1 − 0.9f = 0.100000024), the iterate is rounded as θ⁰ + λ·p′ rather than θ − λ·u, and
    the graph's sums run in another order."""
    p, *rest = CASES[case]()
    fixed = dataclasses.replace(p, learn_x_step=False)
    ours, theirs = both_engines(worker, (fixed, *rest), tmp_path, Settings(iterations=60, batch=16, check=10))
    assert len(theirs.history) == 60
    assert relative(ours.history, theirs.history).max() < 2e-5
    assert ours.loss_rtn == theirs.loss_rtn  # the same numpy code on the same start
    assert theirs.loss < theirs.loss_rtn
    np.testing.assert_allclose(theirs.loss, ours.loss, rtol=2e-5)


@pytest.mark.training
@requires_training
@pytest.mark.parametrize("case", [c for c in CASES if c != "matmul-blocked-float-input"])
def test_engines_agree_with_a_learned_input_step(worker, case, tmp_path):
    """With the input step learned too, the curves agree to float32 rounding at first and then drift
    apart, within a bound: one step s_x scales every input code u = x/s_x (up to ~150 here), so the
    engines' float32 difference in s_x (~1e-7 relative) moves u by ~1e-5 and sends the few values
    within that of a rounding boundary to the other code; straight-through Adam amplifies such
    differences (its step m̂/√v̂ is sensitive where a gradient changes sign). Measured: ≤ 1.2e-6 over
    the first 8 steps, up to 5.5% later, fitted losses within 1.0%."""
    ours, theirs = both_engines(worker, CASES[case](), tmp_path, Settings(iterations=60, batch=16, check=10))
    diff = relative(ours.history, theirs.history)
    assert diff[:8].max() < 2e-5, diff[:8]
    assert diff.max() < 0.15
    assert theirs.loss < theirs.loss_rtn
    np.testing.assert_allclose(theirs.loss, ours.loss, rtol=0.03)


@pytest.mark.training
@requires_training
def test_pass_with_the_ort_training_engine(rng):
    """The pass with ``engine=ort-training`` (parallel mode: every layer's rows come from the fp32
    model, so both engines fit the same rows): every layer at or below round-to-nearest, near the
    numpy engine's loss, and the compile repeats byte for byte with two worker processes."""
    losses, weights = {}, {}
    for name in ("numpy", "ort-training", "ort-training again"):
        state = planned_cnn(np.random.default_rng(0), w_bits=4, target="ort-cpu-avx2")
        AdaQuantPass(mode="parallel", iterations=100, engine=name.split()[0],
                     workers=2 if name.endswith("again") else 1).run(state)
        rows = next(p for p in state.report.passes if p["name"] == "adaquant")["layers"]
        losses[name] = {r["node"]: (r["rtn_loss"], r["loss"]) for r in rows}
        weights[name] = {n: layer.weight.tobytes() for n, layer in state.plan.layers.items()}
    assert weights["ort-training"] == weights["ort-training again"]
    for node, (rtn, loss) in losses["ort-training"].items():
        assert loss <= rtn
        assert rtn == losses["numpy"][node][0]
        np.testing.assert_allclose(loss, losses["numpy"][node][1], rtol=0.05)
    assert losses["ort-training"] == losses["ort-training again"]


@pytest.mark.training
@requires_training
def test_both_engines_hold_the_input_step_inside_its_cap(worker, tmp_path):
    """An input step capped (``x_step_max``, as under a Relu6 bound) at 0.97 × its start, which the fit
    would leave at 0.986 (uncapped): both engines end on the cap (the worker clamps onnxruntime's
    parameter after each Adam step as the numpy engine does), with the same loss curve."""
    p, *rest = CASES["gemm"]()
    p = dataclasses.replace(p, x_step_max=p.x_step * 0.97)
    ours, theirs = both_engines(worker, (p, *rest), tmp_path, Settings(iterations=40, batch=16, check=40))
    np.testing.assert_allclose(ours.theta["x_scale"], 0.97, rtol=1e-7)
    np.testing.assert_allclose(theirs.theta["x_scale"], 0.97, rtol=1e-6)
    assert relative(ours.history, theirs.history).max() < 2e-5
