"""Short value names under the size target (onnxptq/short_names.py)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import onnxptq
from onnxptq.short_names import shorten_names
from tests.conftest import cnn, fvi, make_model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _named(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.name}


def test_size_build_writes_short_names_and_computes_the_same(rng, tmp_path):
    """Every value but the graph's input and output is ``_`` + base 36; only the nodes verification
    looks up keep their names (the planned ops, the report's layers among them); the model computes exactly what the build with the
    source's names computes, with the same fusion coverage, in fewer bytes."""
    model, x = cnn(rng), rng.standard_normal((24, 3, 16, 16)).astype(np.float32)
    options = dict(w_bits=4, target="ort-cpu-size", first_last_8bit=False)
    short = onnxptq.compile(model, {"x": x[:16]}, tmp_path / "s.onnx", **options)
    kept = onnxptq.compile(model, {"x": x[:16]}, tmp_path / "k.onnx", short_names=False, **options)
    s, k = onnx.load(tmp_path / "s.onnx"), onnx.load(tmp_path / "k.onnx")
    values = {i.name for i in s.graph.initializer} | {v for n in s.graph.node for v in (*n.input, *n.output) if v}
    assert {v for v in values if not re.fullmatch(r"_[0-9a-z]+", v)} == {"x", "y"}
    assert {row["node"] for row in short.report["layers"]} <= _named(s) < _named(k)
    assert len(_named(s)) == short.report["verification"]["planned_ops"]
    assert s.ByteSize() < k.ByteSize()
    for a, b in zip(_run(s, x[16:]), _run(k, x[16:])):
        np.testing.assert_array_equal(a, b)
    assert short.report["verification"]["coverage"] == kept.report["verification"]["coverage"] == 1.0


def test_a_graph_with_a_subgraph_keeps_its_names():
    """A branch may read an outer value by name, so such a graph is left as it is."""
    branch = lambda out: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["t"], [out])], "b", [], [fvi(out, [2])])
    model = make_model([helper.make_node("Relu", ["x"], ["t"], name="relu"),
                        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
                        helper.make_node("Cast", ["s"], ["c"], name="cast", to=TensorProto.BOOL),
                        helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("a"),
                                         else_branch=branch("b"))],
                       [fvi("x", [2])], [fvi("y", [2])], {})
    before = model.SerializeToString()
    shorten_names(model, set())
    assert model.SerializeToString() == before
