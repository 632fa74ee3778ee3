"""Bias correction, BN re-estimation and the pipelines that run them, on the synthetic CNN."""

import copy
import json
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxptq
from conftest import cnn, fvi, make_model
from onnxptq import pipelines, runtime
from onnxptq.api import PIPELINE
from onnxptq.cli import main
from onnxptq.data import load_calibration
from onnxptq.errors import InputError
from onnxptq.kernels.moments import ChannelMoments, standardizing_scale
from onnxptq.kernels.saturation import pairs_fit, reduction_rows
from onnxptq.metrics import mean_kl
from onnxptq.model_io import to_ir
from onnxptq.passes.bias_correction import BiasCorrectionPass
from onnxptq.passes.bn_reestimate import BNReestimatePass, bn_targets
from onnxptq.passes.emission import emit_model, output_model
from onnxptq.passes.layer_moments import (depth_levels, fp32_moments, hidden_layers, level_groups,
                                          quantized_moments)
from onnxptq.state import CompileOptions, CompileState, run_passes


@pytest.fixture
def bn_model(rng):
    """The synthetic CNN with conv1's BatchNormalization, and 40 calibration samples."""
    return cnn(rng, bn=True), rng.standard_normal((40, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("axis", [1, -1])
def test_channel_moments_match_numpy_over_batches(rng, axis):
    y = (rng.standard_normal((7, 5, 6, 3)) * rng.uniform(0.1, 3, 5 if axis == 1 else 3).reshape(
        (1, -1, 1, 1) if axis == 1 else (1, 1, 1, -1)) + 50).astype(np.float32)
    moments = ChannelMoments(axis)
    for chunk in np.array_split(y, [1, 4]):  # uneven batches
        moments.update(chunk)
    flat = np.moveaxis(y.astype(np.float64), axis, -1).reshape(-1, y.shape[axis])
    np.testing.assert_allclose(moments.mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.var, flat.var(0), rtol=1e-5)
    assert moments.count == len(flat)


def test_channel_moments_resolve_near_constant_channels():
    """A channel of spread 1e-6 around 7 (a dead channel): float32 centering alone would bias it."""
    y = (7.0 + np.array([-1, 1] * 500, np.float64) * 1e-6).astype(np.float32)[None, :, None]
    moments = ChannelMoments(2)
    moments.update(y)
    np.testing.assert_allclose(moments.std, y.astype(np.float64).std(), rtol=1e-6)


def test_standardizing_scale_leaves_constant_channels():
    np.testing.assert_array_equal(standardizing_scale(np.array([2.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])),
                                  [0.5, 1.0, 1.0])
    np.testing.assert_array_equal(standardizing_scale(np.array([2.0, 1e-9]), np.array([1.0, 2e-9]), 1e-6),
                                  [0.5, 1.0])


def planned(model, x, **options) -> CompileState:
    """A compile state after the core passes that precede the corrections (weight grids included)."""
    state = CompileState(source=model, model=to_ir(model), options=CompileOptions(**options),
                         calib=load_calibration({"x": x}, model, None), holdout=None)
    core = pipelines.build("calibration", PIPELINE)
    run_passes(state, core[:[p.name for p in core].index("emission")])
    return state


def bias_steps(state, name):
    """Per channel, the int32 bias step s_x·s_w emission rounds to."""
    layer = state.plan.layers[name]
    return float(state.plan.act_params(layer.input_name)[0]) * layer.grid.scale.astype(np.float64)


def emitted_codes(state):
    """The weight codes of every layer as emission writes them."""
    inits = emit_model(state.model, state.plan).graph.initializers
    return {name: inits[f"{layer.weight_name}_quantized"].const_value.numpy()
            for name, layer in state.plan.layers.items()}


def test_bias_correction_zeroes_each_layers_mean_error(bn_model):
    state = planned(*bn_model, target="ort-cpu-avx2")
    names = list(state.plan.layers)
    ref = fp32_moments(state, names)
    before = {n: quantized_moments(state, [n])[n].mean - ref[n].mean for n in names}
    BiasCorrectionPass(keep="always").run(state)
    for name in names:
        # measured as the pass measures: one layer at a time, on its corrected prefix
        error = quantized_moments(state, [name])[name].mean - ref[name].mean
        assert np.all(np.abs(error) <= bias_steps(state, name) + 1e-5), (name, error, before[name])
    assert max(np.abs(e).max() / bias_steps(state, n).max() for n, e in before.items()) > 10, "an error to remove"


def test_bias_correction_adds_a_bias_where_there_is_none(bn_model):
    model, x = bn_model
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    del conv2.input[2]
    state = planned(model, x, target="ort-cpu-avx2")
    assert state.plan.layers["conv2"].bias is None
    BiasCorrectionPass(keep="always").run(state)
    assert state.plan.layers["conv2"].bias is not None and np.any(state.plan.layers["conv2"].bias != 0)
    ref = fp32_moments(state, ["conv2"])["conv2"]
    error = quantized_moments(state, ["conv2"])["conv2"].mean - ref.mean
    assert np.all(np.abs(error) <= bias_steps(state, "conv2") + 1e-5)


@pytest.mark.parametrize("target", ["fp32", "bn"])
def test_bn_reestimation_matches_targets_and_keeps_codes(bn_model, target):
    state = planned(*bn_model, target="ort-cpu-avx2")
    layer = state.plan.layers["conv1"]
    assert layer.bn is not None and state.plan.layers["conv2"].bn is None
    codes, scale = emitted_codes(state), layer.grid.scale.copy()
    BNReestimatePass(target=target, keep="always").run(state)
    if target == "fp32":
        ref = fp32_moments(state, ["conv1"])["conv1"]
        mean, std = ref.mean, ref.std
    else:
        mean, std = bn_targets(layer.bn)
    got = quantized_moments(state, ["conv1"])["conv1"]
    np.testing.assert_allclose(got.std, std, rtol=1e-5)
    assert np.all(np.abs(got.mean - mean) <= bias_steps(state, "conv1") + 1e-5)
    after = emitted_codes(state)
    for name in codes:
        np.testing.assert_array_equal(after[name], codes[name])
    rows = reduction_rows(after["conv1"], "Conv", 0)
    assert pairs_fit(rows).all(), "int16-pair safety of the avx2 target is kept"
    assert not np.array_equal(layer.grid.scale, scale), "the scales moved instead"


def test_bn_reestimation_of_hidden_layers(bn_model):
    """layers=hidden re-standardizes layers without a BatchNormalization too, but not the output layer."""
    state = planned(*bn_model, target="ort-cpu-avx2")
    assert hidden_layers(state.model.graph, state.plan.layers) == {"conv1", "conv2"}
    fc = state.plan.layers["fc"].grid.scale.copy()
    BNReestimatePass(layers="hidden", keep="always").run(state)
    np.testing.assert_array_equal(state.plan.layers["fc"].grid.scale, fc)
    for name in ("conv1", "conv2"):
        ref = fp32_moments(state, [name])[name]
        got = quantized_moments(state, [name])[name]
        np.testing.assert_allclose(got.std, ref.std, rtol=1e-5)
        assert np.all(np.abs(got.mean - ref.mean) <= bias_steps(state, name) + 1e-5)


def numpy_distance(state):
    """Mean KL of the softmax of the emitted model's logits to the fp32 model's on the calibration set,
    from both models' outputs."""
    x = {"x": np.concatenate([b["x"] for b in state.calib.batches(64)])}
    ref = runtime.session(state.source).run(None, x)[0]
    test = runtime.session(output_model(state).SerializeToString()).run(None, x)[0]
    return mean_kl(ref, test, False)


@pytest.mark.parametrize("correction, kept", [
    (BNReestimatePass(target="bn"), False),  # β, |γ| of a BatchNorm whose statistics the data do not have
    (BiasCorrectionPass(), True),
])
def test_a_correction_is_kept_only_if_the_outputs_move_nearer_fp32(bn_model, correction, kept):
    """The decision and the distances noted are those of the emitted models on the calibration set
    (mean KL of the logits, recomputed here); a correction not kept leaves every layer as it was, and
    ``keep=always`` keeps the same correction regardless."""
    state = planned(*bn_model, target="ort-cpu-avx2", w_bits=4)
    before_plan = copy.deepcopy(state.plan.layers)
    before = numpy_distance(state)
    always = copy.deepcopy(state)
    correction.run(state)
    after = numpy_distance(state)
    note = next(n for n in state.report.passes[-1]["notes"] if "kept" in n)
    numbers = [float(v) for v in re.search(r"(\d[\d.e-]*) → (\d[\d.e-]*)", note).groups()]
    assert numbers[0] == pytest.approx(before, rel=1e-3)
    if kept:
        assert note.startswith("kept") and after < before and numbers[1] == pytest.approx(after, rel=1e-3)
    else:
        assert note.startswith("not kept") and after == pytest.approx(before, rel=1e-6)
        for name, layer in state.plan.layers.items():
            np.testing.assert_array_equal(layer.grid.scale, before_plan[name].grid.scale)
            np.testing.assert_array_equal(layer.bias, before_plan[name].bias)
        type(correction)(**{**vars(correction), "keep": "always"}).run(always)
        assert numpy_distance(always) > before, "the correction kept regardless moves the outputs away"


def test_depth_levels_put_parallel_branches_on_one_level(rng):
    w = lambda: (rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)  # noqa: E731
    model = make_model([helper.make_node("Conv", ["x", "wa"], ["a"], name="a"),
                        helper.make_node("Conv", ["x", "wb"], ["b"], name="b"),
                        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
                        helper.make_node("Conv", ["s", "wc"], ["c"], name="c"),
                        helper.make_node("Conv", ["x", "wd"], ["d"], name="d"),
                        helper.make_node("Add", ["c", "d"], ["y"], name="out")],
                       [fvi("x", [1, 4, 4, 4])], [fvi("y", [1, 4, 4, 4])],
                       {"wa": w(), "wb": w(), "wc": w(), "wd": w()})
    graph = to_ir(model).graph
    assert depth_levels(graph, ["a", "b", "c", "d"]) == {"a": 0, "b": 0, "c": 1, "d": 0}
    assert level_groups(graph, ["a", "b", "c", "d"]) == [["a", "b", "d"], ["c"]]
    assert depth_levels(graph, ["c", "d"]) == {"c": 0, "d": 0}


@pytest.mark.parametrize("spec, needle", [
    ("calibration,bogus", "unknown pass 'bogus'"),
    ("bias-correction,bias-correction", "listed twice"),
    ("bn-reestimate:target=ema", "target must be one of fp32, bn"),
    ("bn-reestimate:eps=1", "bad option 'eps=1'"),
    ("bn-reestimate:layers=hidden:target=bn", "layers=hidden needs target=fp32"),
    ("bias-correction:x=1", "options of bias-correction: keep=<str>"),
    ("bias-correction:keep=never", "keep must be one of nearer, always"),
    ("adaquant:mode=serial", "mode must be parallel or sequential"),
    ("bn-reestimate:layers=bn,target=bn", "separated by ':'"),
])
def test_spec_errors_are_one_line(spec, needle):
    with pytest.raises(InputError) as err:
        pipelines.build(spec, PIPELINE)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_specs_build_pass_lists():
    names = lambda spec: [p.name for p in pipelines.build(spec, PIPELINE)]  # noqa: E731
    core = [p.name for p in PIPELINE]
    at = core.index("emission")
    assert names("calibration") == core
    assert names("light") == [*core[:at], "bn-reestimate", "bias-correction", *core[at:]]
    assert names(" weights , bias-correction ,bn-reestimate") == [*core[:at], "bias-correction", "bn-reestimate",
                                                                   *core[at:]]
    assert pipelines.build("bn-reestimate:target=bn", PIPELINE)[at].target == "bn"
    assert pipelines.build("light", PIPELINE)[at].layers == "hidden"


@pytest.mark.parametrize("spec, warned", [
    ("advanced", []), ("light", []), ("adaquant,bn-reestimate,bias-correction", []),
    ("adaquant,bias-correction", ["bias-correction"]), ("adaquant,bias-tuning", ["bias-tuning"]),
    ("bn-reestimate,adaquant,bias-correction", ["bias-correction"]),
    ("bias-correction,adaquant", []),
])
def test_bias_correction_after_adaquant_without_bn_reestimation_is_warned(spec, warned):
    warnings = pipelines.order_warnings(pipelines.build(spec, PIPELINE))
    assert [w.split()[1] for w in warnings] == warned
    assert all("follows adaquant" in w and "\n" not in w for w in warnings)


def test_the_order_warning_reaches_the_report(bn_model):
    result = onnxptq.compile(bn_model[0], {"x": bn_model[1]}, pipeline="adaquant:iterations=2,bias-correction",
                             target="ort-cpu-avx2")
    assert [w for w in result.report["warnings"] if w.startswith("pipeline: bias-correction follows adaquant")]


@pytest.mark.parametrize("spec", ["light", "calibration", "bias-correction", "bn-reestimate", "bn-reestimate,bias-tuning"])
def test_compile_with_each_pipeline(bn_model, spec):
    result = onnxptq.compile(bn_model[0], {"x": bn_model[1]}, pipeline=spec, target="ort-cpu-avx2")
    ran = [p["name"] for p in result.report["passes"]]
    assert ("bias-correction" in ran) == ("bias" in spec or spec == "light")
    assert ("bn-reestimate" in ran) == ("bn" in spec or spec == "light")
    assert result.report["options"]["pipeline"] == spec
    assert not [w for w in result.report["warnings"] if w.startswith("pipeline:")]
    assert result.report["verification"]["coverage"] == 1.0
    assert result.report["verification"]["outputs"]["y"]["sqnr_db"] > 30


def test_bias_correction_reaches_float_biases_of_int4_layers(bn_model):
    """MatMulNBits layers keep a float bias: emission writes the plan's corrected value."""
    model, x = bn_model
    result = onnxptq.compile(model, {"x": x}, w_bits=4, pipeline="bias-correction", target="ort-cpu-size",
                             first_last_8bit=False, short_names=False)
    biases = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    source = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert biases["bf"].dtype == np.float32 and not np.array_equal(biases["bf"], source["bf"])


def test_cli_pipeline_flag(bn_model, tmp_path, capsys):
    model, x = bn_model
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=x)
    args = ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "q.onnx"), "-q"]
    assert main(args + ["--pipeline", "calibration,bias-correction"]) == 0
    assert main(args + ["--pipeline", "calibration,adaround"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown pass 'adaround'" in err[0]


def test_the_summary_says_which_correction_was_put_back(bn_model, tmp_path, capsys):
    model, x = bn_model
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=x)
    args = ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--w-bits", "4"]
    assert main(args + ["-o", str(tmp_path / "q.onnx"), "--json", str(tmp_path / "r.json"),
                        "--pipeline", "bn-reestimate:target=bn"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    notes = next(p for p in json.loads((tmp_path / "r.json").read_text())["passes"] if p["name"] == "bn-reestimate")
    assert "bn-reestimate not kept: it moved the outputs away from fp32" in out
    assert any(n.startswith("not kept") for n in notes["notes"])
    assert main(args + ["-o", str(tmp_path / "q2.onnx"), "--pipeline", "bn-reestimate:target=bn:keep=always"]) == 0
    assert "not kept" not in capsys.readouterr().out


def test_each_emitted_model_is_measured_once(bn_model, monkeypatch):
    """BN re-estimation then bias correction: the second's distance before it is the first's after it,
    so three models are run, not four."""
    from onnxptq.passes import kept

    runs = []
    distance = kept.output_distance
    monkeypatch.setattr(kept, "output_distance", lambda *args: runs.append(1) or distance(*args))
    state = planned(*bn_model, target="ort-cpu-avx2", w_bits=4)
    BNReestimatePass(layers="hidden").run(state)
    BiasCorrectionPass().run(state)
    assert len(runs) == 3
    bn, bias = (next(n for n in p["notes"] if "→" in n) for p in state.report.passes[-2:])
    assert re.search(r"→ (\d[\d.e-]*)", bn).group(1) == re.search(r"(\d[\d.e-]*) →", bias).group(1)
