"""Every kind of bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import fvi, make_model
from onnxptq.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def assert_bad(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out" / "q.onnx"


@pytest.fixture
def outdir(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_missing_model(tmp_path, cnn_files, outdir, capsys):
    _, calib = cnn_files
    assert_bad(*run_cli(["compile", tmp_path / "nope.onnx", "--calib", calib, "-o", outdir / "q.onnx"], capsys),
               "not found")
    assert not any(outdir.iterdir())


def test_not_onnx_and_truncated(tmp_path, cnn_files, outdir, capsys):
    model, calib = cnn_files
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello, I am not a model")
    assert_bad(*run_cli(["compile", junk, "--calib", calib, "-o", outdir / "q.onnx"], capsys), "not a readable ONNX")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(model.read_bytes()[:200])
    assert_bad(*run_cli(["compile", trunc, "--calib", calib, "-o", outdir / "q.onnx"], capsys), "ONNX")
    assert not any(outdir.iterdir())


def test_no_quantizable_layers(tmp_path, outdir, capsys):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", ["N", 4])], [fvi("y", ["N", 4])], {})
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=np.ones((4, 4), np.float32))
    assert_bad(*run_cli(["compile", path, "--calib", tmp_path / "c.npz", "-o", outdir / "q.onnx"], capsys),
               "no quantizable layers")
    assert not any(outdir.iterdir())


@pytest.mark.parametrize("arrays,needle", [
    ({"y": np.zeros((4, 3, 16, 16), np.float32)}, "missing ['x']"),
    ({"x": np.zeros((4, 3, 8, 8), np.float32)}, "shape"),
    ({"x": np.zeros((4, 3, 16, 16), np.float64)}, "dtype float64"),
    ({"x": np.zeros((0, 3, 16, 16), np.float32)}, "empty"),
    ({"x": np.full((4, 3, 16, 16), np.nan, np.float32)}, "NaN"),
])
def test_calibration_data_mismatch(tmp_path, cnn_files, outdir, capsys, arrays, needle):
    model, _ = cnn_files
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    assert_bad(*run_cli(["compile", model, "--calib", bad, "-o", outdir / "q.onnx"], capsys), needle)
    assert not any(outdir.iterdir())


def test_output_equal_to_input_is_refused_and_input_untouched(cnn_files, capsys):
    model, calib = cnn_files
    before = model.read_bytes()
    assert_bad(*run_cli(["compile", model, "--calib", calib, "-o", model], capsys), "is the input")
    assert model.read_bytes() == before


def test_unwritable_output(cnn_files, tmp_path, capsys):
    model, calib = cnn_files
    assert_bad(*run_cli(["compile", model, "--calib", calib, "-o", tmp_path / "no" / "such" / "q.onnx"], capsys),
               "does not exist")
    if os.geteuid() != 0:  # root can write anywhere; the missing-folder case above covers it there
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert_bad(*run_cli(["compile", model, "--calib", calib, "-o", ro / "q.onnx"], capsys), "not writable")


@pytest.mark.parametrize("flag,value,needle", [
    ("--calib-method", "magic", "--calib-method"),
    ("--w-bits", "5", "--w-bits"),
    ("--target", "tpu", "--target"),
    ("--exclude", "(", "regular expression"),
    ("--block-size", "48", "--block-size 48"),
])
def test_unknown_option_values(cnn_files, outdir, capsys, flag, value, needle):
    model, calib = cnn_files
    assert_bad(*run_cli(["compile", model, "--calib", calib, "-o", outdir / "q.onnx", flag, value], capsys), needle)
    assert not any(outdir.iterdir())


def test_existing_output_is_kept_when_compile_fails(cnn_files, tmp_path, capsys):
    model, _ = cnn_files
    dest = tmp_path / "q.onnx"
    dest.write_bytes(b"previous result")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 8, 8), np.float32))
    assert_bad(*run_cli(["compile", model, "--calib", bad, "-o", dest], capsys), "shape")
    assert dest.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_budget_missed_exits_1_and_writes(cnn_files, outdir, capsys):
    model, calib = cnn_files
    code, err = run_cli(["compile", model, "--calib", calib, "-o", outdir / "q.onnx", "--min-sqnr", "200", "-q"], capsys)
    assert code == 1 and "SQNR" in err and (outdir / "q.onnx").exists()


def test_console_script_exit_code(cnn_files, tmp_path):
    """The installed entry point behaves the same (a subprocess, so nothing is shared with pytest)."""
    model, calib = cnn_files
    proc = subprocess.run([sys.executable, "-m", "onnxptq.cli", "compile", str(model), "--calib", str(calib),
                           "-o", str(model)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
