"""Shared builders for small synthetic models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    """A checked model from helper nodes; ``inits`` maps names to numpy arrays."""
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def cnn(rng: np.random.Generator, bn: bool = False) -> onnx.ModelProto:
    """Conv(+BN)→Relu→MaxPool → Conv→Clip(0,6) → Add(skip) → GAP → Flatten → Gemm; 8 channels."""
    f = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    inits = {"w1": f(8, 3, 3, 3), "b1": f(8), "w2": f(8, 8, 3, 3), "b2": f(8), "wf": f(10, 8), "bf": f(10),
             "lo": np.float32(0), "hi": np.float32(6)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    src = "c1"
    if bn:
        inits.update({"g": (rng.uniform(0.5, 1.5, 8)).astype(np.float32), "be": f(8), "mu": f(8),
                      "var": rng.uniform(0.5, 2, 8).astype(np.float32)})
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn1"], name="bn1"))
        src = "bn1"
    nodes += [
        helper.make_node("Relu", [src], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip2"),
        helper.make_node("Add", ["r2", "p1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [fvi("x", ["N", 3, 16, 16])], [fvi("y", ["N", 10])], inits)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def cnn_files(tmp_path, rng):
    """(model path, calibration .npz path) of the synthetic CNN with 40 samples."""
    model_path = tmp_path / "cnn.onnx"
    onnx.save(cnn(rng), model_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((40, 3, 16, 16)).astype(np.float32))
    return model_path, calib


@pytest.fixture
def harmful_bitsplit(monkeypatch):
    """BitSplit made harmful on purpose: each solution's code signs flipped, and let through the
    solver's own check against round to nearest (``write_if_better`` always writes and keeps). Call it
    to switch it on (after compiling any reference)."""
    import onnxptq.passes.bitsplit as bitsplit_pass
    from onnxptq.kernels.bitsplit import solve

    def flipped(*args, **kwargs):
        result = solve(*args, **kwargs)
        result.codes = -result.codes
        return result

    def always(state, layer, write, loss, before=None):
        write()
        return bitsplit_pass.Checked(1.0, 0.5, True)

    def switch_on() -> None:
        monkeypatch.setattr(bitsplit_pass, "solve", flipped)
        monkeypatch.setattr(bitsplit_pass, "write_if_better", always)

    return switch_on
