"""Class heads split by calibration reach (passes/heads.py): detection, exactness of the split, the
parts' bands, and a size budget that gives the never-probable classes fewer bits."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import onnxptq
from conftest import fvi, make_model
from onnxptq import runtime
from onnxptq.cli import main
from onnxptq.data import load_calibration
from onnxptq.model_io import to_ir
from onnxptq.passes.fusion import FusionPass
from onnxptq.passes.heads import MAX_UNSEEN, REACH_BANDS, HeadSplitPass, class_heads, unseen_rate
from onnxptq.passes.verification import optimized_kernels
from onnxptq.state import CompileOptions, CompileState

CLASSES = 400


def classifier(rng, positions: int | None = None, softmax: bool = True, never: int = CLASSES - 40) -> onnx.ModelProto:
    """x → MatMul → Relu → MatMul → Add(bias) [→ Softmax]: ``positions`` adds a sequence axis (the
    head stays a MatMul; without it fusion makes MatMul + Add a Gemm). The bias makes classes 0–19
    always probable, the last ``never`` never, the others sometimes."""
    bias = np.full(CLASSES, -1.0, np.float32)
    bias[:20], bias[CLASSES - never:] = 2.0, -14.0
    inits = {"w1": (rng.standard_normal((32, 64)) / 6).astype(np.float32),
             "wh": (rng.standard_normal((64, CLASSES)) / 8).astype(np.float32), "bh": bias}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "wh"], ["z"], name="head"),
             helper.make_node("Add", ["z", "bh"], ["logits"], name="bias")]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1))
    lead = ["N"] if positions is None else ["N", positions]
    return make_model(nodes, [fvi("x", [*lead, 32])], [fvi("y" if softmax else "logits", [*lead, CLASSES])], inits)


def calib(rng, positions: int | None = None, n: int = 48) -> dict[str, np.ndarray]:
    shape = (n, 32) if positions is None else (n, positions, 32)
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def split_state(model: onnx.ModelProto, data: dict, **options) -> CompileState:
    state = CompileState(source=model, model=to_ir(model), options=CompileOptions(**options),
                         calib=load_calibration(data, model, None), holdout=None)
    FusionPass().run(state)
    HeadSplitPass().run(state)
    return state


@pytest.mark.parametrize("positions, softmax", [(None, True), (3, True), (None, False)])
def test_class_heads_are_found_through_bias_and_softmax(rng, positions, softmax):
    # rank 2: fusion makes MatMul + Add a Gemm (logits, or into the Softmax); rank 3: MatMul → Add → Softmax
    model, data = classifier(rng, positions, softmax), calib(rng, positions)
    fused = split_state(model, data)  # no budget: fused, not split
    found = class_heads(fused.model)
    assert list(found) == ["head"] and found["head"][1] is softmax
    nodes = {n.name for n in split_state(model, data, size_ratio=0.3).model.graph}
    assert "head" not in nodes and {"head_part0", "head_part1", "head_part2", "head_channels"} <= nodes


def test_a_layer_that_is_not_a_class_head_is_left_whole(rng):
    # an embedding (no Softmax, output not a Gemm/MatMul) and a Softmax over a non-last axis
    model = classifier(rng)
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.attribute[0].i = 0
    assert class_heads(to_ir(model)) == {}


@pytest.mark.parametrize("positions", [None, 3])
def test_the_split_model_computes_the_same_outputs_and_parts_follow_the_bands(rng, positions):
    model, data = classifier(rng, positions), calib(rng, positions)
    state = split_state(model, data, size_ratio=0.3)
    split = ir.serde.serialize_model(state.model)
    x = rng.standard_normal((5,) + data["x"].shape[1:]).astype(np.float32)
    ref = runtime.session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(runtime.session(split).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-7)
    # the parts hold the columns of the classes in each band of reach, in ascending class order
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    h = np.maximum(data["x"] @ w["w1"], 0)
    z = h @ w["wh"] + w["bh"]
    p = np.exp(z - z.max(-1, keepdims=True))
    reach = (p / p.sum(-1, keepdims=True)).reshape(-1, CLASSES).max(0)
    band = np.digitize(reach, REACH_BANDS)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in split.graph.initializer}
    parts = [n for n in split.graph.node if n.name.startswith("head_part")]
    assert len(parts) == len(set(band)) == 3
    for g, node in enumerate(parts):
        columns = np.flatnonzero(band == g)
        if node.op_type == "Gemm":  # rank 2: MatMul + Add fused into a Gemm, the bias sliced too
            np.testing.assert_array_equal(inits[node.input[2]], w["bh"][columns])
        np.testing.assert_array_equal(inits[node.input[1]], w["wh"][:, columns])


def test_no_byte_budget_or_few_never_probable_classes_leave_the_head_whole(rng):
    cases = ((CLASSES - 40, {}), (CLASSES - 40, {"bops_ratio": 0.2}), (CLASSES // 3, {"size_ratio": 0.3}))
    for never, options in cases:
        state = split_state(classifier(rng, never=never), calib(rng), **options)
        assert "head" in {n.name for n in state.model.graph}, (never, options)
    assert "head" not in {n.name for n in split_state(classifier(rng, never=CLASSES // 2 + 20), calib(rng),
                                                          size_ratio=0.3).model.graph}


def test_unseen_rate_counts_the_classes_that_reach_the_edge_at_one_position():
    p = np.full((4, 5), 1e-4)
    p[:, 0] = 0.9  # at every position
    p[1, 1] = p[2, 1] = 0.01  # at two
    p[3, 2] = 0.002  # at one
    p[0, 3] = 0.001  # at one, on the edge
    assert unseen_rate(p) == 2 / 4


def test_a_head_is_split_only_where_the_calibration_set_shows_each_class_more_than_once(rng):
    """Classes 20..51 each reach r ≥ 10⁻³ on one one-hot input only: seen once each, u = 32 / 32 and the
    head is left whole, with a note; the same 32 inputs twice over see each twice, u = 0, and it is split."""
    w1 = np.zeros((32, 64), np.float32)
    w1[:, :32] = np.eye(32)
    wh = np.zeros((64, CLASSES), np.float32)
    wh[np.arange(32), 20 + np.arange(32)] = 14.0
    bias = np.full(CLASSES, -14.0, np.float32)
    bias[:20] = 2.0
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                        helper.make_node("Relu", ["h"], ["r"], name="relu"),
                        helper.make_node("MatMul", ["r", "wh"], ["z"], name="head"),
                        helper.make_node("Add", ["z", "bh"], ["logits"], name="bias"),
                        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1)],
                       [fvi("x", ["N", 32])], [fvi("y", ["N", CLASSES])], {"w1": w1, "wh": wh, "bh": bias})
    once = {"x": np.eye(32, dtype=np.float32)}
    state = split_state(model, once, size_ratio=0.3)
    assert "head" in {n.name for n in state.model.graph}
    (note,) = next(p for p in state.report.passes if p["name"] == "head-split")["notes"]
    assert note.startswith("head left whole") and "about 1.00 classes" in note and f"≤ {MAX_UNSEEN:g}" in note
    twice = {"x": np.tile(np.eye(32, dtype=np.float32), (2, 1))}
    parts = [n.name for n in split_state(model, twice, size_ratio=0.3).model.graph if "_part" in n.name]
    assert parts == ["head_part0", "head_part1"], parts


def test_a_size_budget_gives_the_never_probable_classes_fewer_bits(rng, tmp_path):
    model, data = classifier(rng), calib(rng)
    out = tmp_path / "q.onnx"
    options = dict(size_ratio=0.18, target="ort-cpu-size", candidates="w8a8,w4a8,w2a8")
    result = onnxptq.compile(model, data, out, **options)
    choice = {l["node"]: l["choice"] for l in result.report["mixed"]["layers"]}
    assert choice["head_part0"] == "w2a8" and choice["head_part2"] != "w2a8", choice
    assert out.stat().st_size <= options["size_ratio"] * model.ByteSize()
    kernels = optimized_kernels(onnx.load(out))
    assert all(kernels[f"head_part{g}"] != "MatMul" and kernels[f"head_part{g}"] != "Gemm" for g in range(3)), kernels
    x = rng.standard_normal((64, 32)).astype(np.float32)
    ref, test = (runtime.session(m).run(None, {"x": x})[0] for m in (model, str(out)))
    assert (ref.argmax(-1) == test.argmax(-1)).mean() >= 0.9
    again = tmp_path / "again.onnx"
    onnxptq.compile(model, data, again, **options)
    assert again.read_bytes() == out.read_bytes()


def test_the_summary_says_what_each_part_holds(rng, tmp_path, capsys):
    model, data = classifier(rng), calib(rng)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **data)
    assert main(["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "-o",
                 str(tmp_path / "q.onnx"), "--size-ratio", "0.2", "--target", "ort-cpu-size"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    never = CLASSES - 40
    assert f"class head split: head → head_part0 ({never} classes, r < 0.001), head_part1 (" in out, out


def test_a_softmax_before_opset_13_without_axis_is_not_over_the_classes(rng):
    # opset 11: Softmax's default axis is 1, normalizing [N, T, C] over T·C together
    model = classifier(rng, positions=3)
    model.opset_import[0].version = 11
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    del softmax.attribute[:]
    assert class_heads(to_ir(model)) == {}
    rank2 = classifier(rng)
    rank2.opset_import[0].version = 11
    del next(n for n in rank2.graph.node if n.op_type == "Softmax").attribute[:]
    assert list(class_heads(split_state(rank2, calib(rng)).model)) == ["head"], "axis 1 is the last of two"


def test_a_gemm_bias_broadcast_over_the_classes_goes_whole_to_every_part(rng):
    bias = np.full(CLASSES, -14.0, np.float32)
    bias[:20] = 2.0
    inits = {"wh": (rng.standard_normal((CLASSES, 32)) / 8).astype(np.float32), "c": np.array([0.5], np.float32),
             "bh": bias}
    nodes = [helper.make_node("Gemm", ["x", "wh", "c"], ["z"], name="head", transB=1),
             helper.make_node("Add", ["z", "bh"], ["logits"], name="bias"),
             helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1)]
    model = make_model(nodes, [fvi("x", ["N", 32])], [fvi("y", ["N", CLASSES])], inits)
    data = calib(rng)
    state = split_state(model, data, size_ratio=0.3)
    parts = [n for n in state.model.graph if n.name.startswith("head_part")]
    assert len(parts) == 2 and all(p.inputs[2].name == "c" for p in parts)
    assert "wh" not in state.model.graph.initializers, "the unsplit weight is dropped"
    x = data["x"][:5]
    np.testing.assert_allclose(runtime.session(ir.serde.serialize_model(state.model)).run(None, {"x": x})[0],
                               runtime.session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-7)
