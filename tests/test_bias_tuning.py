"""Bias tuning: the training graph computes the emitted model's KL to fp32; training lowers it and writes
the biases the emitted model then carries; without onnxruntime-training it is bias correction."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx import helper

from conftest import cnn, fvi, make_model
from onnxptq import runtime
from onnxptq.metrics import mean_kl
from onnxptq.passes.bias_correction import BiasCorrectionPass
from onnxptq.passes.bias_tuning import BiasTuningPass, _differentiable, loss_graph, training_batches
from onnxptq.passes.emission import emit_model
from onnxptq.training import engine
from test_bad_input import assert_bad, run_cli
from test_corrections import planned

requires_training = pytest.mark.skipif(engine.find_training_python() is None, reason=(
    "no onnxruntime-training environment: `make .venv-training/.installed`"))


def cnn_state(**options):
    """The synthetic CNN planned at 2-bit weights and 4-bit activations (a KL to fp32 worth tuning),
    the same on every call."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 16, 16)).astype(np.float32)
    return planned(cnn(rng), x, w_bits=2, a_bits=4, target="ort-cpu-avx2", first_last_8bit=False, **options), x


def emitted_kl(state, x, level: str = "all") -> float:
    """Mean KL of the emitted QDQ model's class scores to the fp32 model's on ``x``."""
    fp32 = runtime.session(ir.serde.serialize_model(state.model)).run(None, {"x": x})[0]
    quantized = runtime.session(ir.serde.serialize_model(emit_model(state.model, state.plan)), level=level).run(
        None, {"x": x})[0]
    return mean_kl(fp32, quantized)


@pytest.mark.training
@requires_training
def test_the_loss_graph_is_the_emitted_models_kl_and_training_lowers_it_on_held_out_samples():
    """Zero steps: the graph's loss over the calibration batches is the emitted model's mean KL (FakeQuant
    on every planned activation, weights at their codes, int32 biases). Trained: the biases kept lower
    the emitted model's KL on the held-out batch (the last 8 of 40 samples, never trained on); the
    logits' biases are bias correction's."""
    state, x = cnn_state()
    BiasCorrectionPass().run(state)
    corrected = emitted_kl(state, x[32:])
    proto, trainable = loss_graph(state, {"conv1": np.ones(8, np.float32), "conv2": np.ones(8, np.float32)})
    assert set(trainable) == {"conv1", "conv2"}
    with engine.TrainingWorker(engine.find_training_python()) as worker:
        _, info = worker.train_graph(proto.SerializeToString(), training_batches(state, 8), list(trainable.values()),
                                     steps=0, lr=0.01, holdout=0, check=1, seed=0)
    assert info["before"] == info["after"] == pytest.approx(emitted_kl(state, x, "basic"), rel=1e-4)

    tuned, _ = cnn_state()
    BiasTuningPass(steps=100, lr=0.01, check=10, margin=0.0).run(tuned)
    note = next(p for p in tuned.report.passes if p["name"] == "bias-tuning")["notes"][0]
    assert "on 1 held-out batches" in note and "kept" in note, note
    assert emitted_kl(tuned, x[32:]) < corrected
    np.testing.assert_array_equal(tuned.plan.layers["fc"].bias, state.plan.layers["fc"].bias)

    # the same training asked to lower the held-out loss by 99%: put back, bias correction's biases
    strict, _ = cnn_state()
    BiasTuningPass(steps=100, lr=0.01, check=10, margin=0.99).run(strict)
    note = next(p for p in strict.report.passes if p["name"] == "bias-tuning")["notes"][0]
    assert "not 99% lower, put back" in note, note
    for name, layer in strict.plan.layers.items():
        np.testing.assert_array_equal(layer.bias, state.plan.layers[name].bias)


def test_without_onnxruntime_training_it_is_bias_correction(monkeypatch):
    monkeypatch.setattr(engine, "find_training_python", lambda: None)
    state, reference = cnn_state()[0], cnn_state()[0]
    BiasTuningPass().run(state)
    BiasCorrectionPass().run(reference)
    for name, layer in state.plan.layers.items():
        np.testing.assert_array_equal(layer.bias, reference.plan.layers[name].bias)
    note = next(p for p in state.report.passes if p["name"] == "bias-tuning")["notes"][0]
    assert "onnxruntime-training is not installed" in note and "not tuned" in note


def test_a_worker_that_dies_is_reported_with_its_exit_code():
    with engine.TrainingWorker(Path("/bin/false")) as worker:
        with pytest.raises(RuntimeError, match=r"worker stopped \(exit code 1\): no message"):
            worker.train_graph(b"", [], [], steps=0, lr=0.0, holdout=0, check=1, seed=0)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_ops_without_gradients_are_rewritten_into_ops_with_them_and_the_same_values(rng, keepdims):
    """GlobalMaxPool → MaxPool over the whole extent, ReduceMax over one axis → TopK(1) (squeezed),
    HardSigmoid/HardSwish → Mul, Add, Clip."""
    nodes = [helper.make_node("GlobalMaxPool", ["x"], ["g"], name="gmp"),
             helper.make_node("ReduceMax", ["x"], ["r"], name="rmax", axes=[1], keepdims=keepdims),
             helper.make_node("HardSigmoid", ["x"], ["hs"], name="hsig", alpha=0.3, beta=0.4),
             helper.make_node("HardSwish", ["x"], ["hw"], name="hswish")]
    model = make_model(nodes, [fvi("x", [2, 3, 5])], [fvi("g", [2, 3, 1]), fvi("r", [2, 1, 5] if keepdims else [2, 5]),
                                                      fvi("hs", [2, 3, 5]), fvi("hw", [2, 3, 5])], {}, opset=15)
    x = (rng.standard_normal((2, 3, 5)) * 4).astype(np.float32)  # across both bends of the hard functions
    want = runtime.session(model).run(None, {"x": x})  # (onnx.reference's GlobalMaxPool drops the channel axis)
    rewritten = ir.serde.deserialize_model(model)
    _differentiable(rewritten.graph, 15)
    assert {n.op_type for n in rewritten.graph} >= {"MaxPool", "TopK"}
    assert not {"GlobalMaxPool", "ReduceMax", "HardSigmoid", "HardSwish"} & {n.op_type for n in rewritten.graph}
    got = runtime.session(ir.serde.serialize_model(rewritten)).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("option", ["steps=-1", "batch=0", "check=0", "lr=0", "holdout=1", "holdout=-0.5", "margin=1"])
def test_bad_options_are_one_line_errors(option, cnn_files, tmp_path, capsys):
    model, calib = cnn_files
    assert_bad(*run_cli(["compile", model, "--calib", calib, "-o", str(tmp_path / "q.onnx"),
                         "--pipeline", f"bias-tuning:{option}"], capsys), "bias-tuning", option.split("=")[0])
    assert not (tmp_path / "q.onnx").exists()
