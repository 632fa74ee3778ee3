"""The CLI's happy paths: compile (summary + JSON), inspect, eval."""

import json
import re

import onnx

from onnxptq.cli import main


def test_compile_writes_model_and_json(cnn_files, tmp_path, capsys):
    model, calib = cnn_files
    code = main(["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"),
                 "--json", str(tmp_path / "r.json"), "--min-coverage", "1.0", "--min-top1", "0.9"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0 and "fusion coverage 100.0%" in out and "QLinearConv" in out
    # Off a terminal (a CI log) progress is one line per finished step, no redrawn bars or blank lines.
    steps = captured.err.splitlines()
    assert steps and all(line.strip() for line in steps), captured.err
    assert re.fullmatch(r"calibration: ranges: 4/4 in \d+\.\d s", steps[0]), steps[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["coverage"] == 1.0
    assert report["options"]["calib_method"] == "mse" and report["model"]["target"].startswith("ort-cpu-")
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert meta["onnxptq"]["options"] == report["options"], "the options are echoed into the model"


def test_inspect_lists_layers(cnn_files, capsys):
    model, _ = cnn_files
    assert main(["inspect", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [l["node"] for l in info["layers"]] == ["conv1", "conv2", "fc"]
    assert info["ops"]["Conv"] == 2 and info["inputs"][0]["shape"] == ["?", 3, 16, 16]


def test_eval_reports_agreement_size_and_latency(cnn_files, tmp_path, capsys):
    model, calib = cnn_files
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "-q"]) == 0
    assert main(["eval", str(model), str(tmp_path / "q.onnx"), "--data", str(calib), "--runs", "3",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["samples"] == 40 and result["outputs"]["y"]["top1_agreement"] >= 0.9
    assert result["latency_ratio"] > 0 and result["size_ratio"] > 0
