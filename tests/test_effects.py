"""Per-pass effects: each listed agreement is the agreement of the compile stopped after that pass."""

import numpy as np
import pytest

import onnxptq
from conftest import cnn


@pytest.fixture
def data(rng):
    return rng.standard_normal((40, 3, 16, 16)).astype(np.float32)


def test_effects_are_the_agreements_of_the_truncated_pipelines(rng, data):
    """weights → bitsplit → bn-reestimate → bias-correction, each entry against a separate compile
    that ends there (its verification measures the same held-back samples); passes that leave the
    model unchanged (tables, mixed precision without a budget) are not listed. BitSplit runs in
    sequential mode: the parallel mode's output check prices each layer as the pipeline's corrections
    will leave it, so a compile truncated before them would judge differently. Both corrections are
    kept regardless of their effect (``keep=always``), so that each is listed."""
    model = cnn(rng)
    options = dict(w_bits=3, weight_solver="bitsplit-sequential", first_last_8bit=False,
                   pipeline="bn-reestimate:layers=hidden:keep=always,bias-correction:keep=always")
    report = onnxptq.compile(model, {"x": data}, **options).report
    effects = report["effects"]
    assert [e["after"] for e in effects] == ["weights", "bitsplit", "bn-reestimate", "bias-correction"]
    truncated = {"weights": dict(weight_solver="rtn", pipeline="calibration"),
                 "bitsplit": dict(pipeline="calibration"),
                 "bn-reestimate": dict(pipeline="bn-reestimate:layers=hidden:keep=always")}
    for entry in effects[:-1]:
        stopped = onnxptq.compile(model, {"x": data}, **{**options, **truncated[entry["after"]],
                                                          "pass_effects": False}).report
        assert entry["outputs"] == stopped["verification"]["outputs"], entry["after"]
    assert effects[-1]["outputs"] == report["verification"]["outputs"]
    sqnr = [e["outputs"]["y"]["sqnr_db"] for e in effects]
    assert len(set(sqnr)) == len(sqnr), "every listed pass changed the agreement"


def test_no_pass_effects_writes_the_same_model(rng, data):
    model = cnn(rng)
    with_effects = onnxptq.compile(model, {"x": data}, w_bits=4)
    without = onnxptq.compile(model, {"x": data}, w_bits=4, pass_effects=False)
    assert "effects" not in without.report and len(with_effects.report["effects"]) >= 2
    assert with_effects.model.graph.SerializeToString() == without.model.graph.SerializeToString()
