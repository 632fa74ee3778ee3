"""Cost facts: storage bytes per encoding against the emitted files, and per-layer latency."""

import numpy as np
import onnx
import pytest

import onnxptq
from conftest import cnn
from onnxptq.costs import ENCODINGS, Compact, cost_table, encodings_for, storage_bytes
from test_compile import mlp

LAYERS = {"conv1": ("w1", "b1"), "conv2": ("w2", "b2"), "fc": ("wf", "bf"), "mm1": ("w1", None), "mm2": ("w2", None)}  # the mlp's bias Add is 3-D: no Gemm


def initializer_bytes(model: onnx.ModelProto, weight: str, bias: str | None) -> int:
    """Bytes of the initializers emission wrote for one layer (codes, scales, zero points, bias)."""
    names = {weight, bias} - {None}
    return sum(len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer
               if i.name in names or any(i.name.startswith(f"{n}_") for n in names))


@pytest.mark.parametrize("target,w_bits", [("ort-cpu-avx2", 8), ("ort-cpu", 4), ("ort-cpu-size", 8),
                                            ("ort-cpu-size", 4), ("ort-cpu-size", 3), ("ort-cpu-size", 2),
                                            ("generic-qdq", 4)])
@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_storage_bytes_match_the_emitted_initializers(rng, which, target, w_bits):
    model = cnn(rng) if which == "cnn" else mlp(rng)
    shape = (20, 3, 16, 16) if which == "cnn" else (20, 5, 64)
    result = onnxptq.compile(model, {"x": rng.standard_normal(shape).astype(np.float32)}, w_bits=w_bits,
                             target=target, first_last_8bit=False, pipeline="calibration", short_names=False)
    encodings = {row["encoding"] for row in result.report["layers"]}
    expected = {("ort-cpu-avx2", 8): {"int8"}, ("ort-cpu", 4): {"int8"}, ("ort-cpu-size", 8): {"int8"},
                ("generic-qdq", 4): {"int4-qdq"},
                ("ort-cpu-size", 4): {"int4-cast", "int4-blocks"} if which == "cnn" else {"int4-blocks"},
                ("ort-cpu-size", 3): {"int3-cast"}, ("ort-cpu-size", 2): {"int2-cast"}}
    assert encodings <= expected[target, w_bits] and encodings
    for row in result.report["layers"]:
        assert row["bytes"] == initializer_bytes(result.model, *LAYERS[row["node"]]), row


def test_storage_bytes_formulas():
    # a 3×3 Conv 16 → 32 with bias: n = 4608 weights
    assert storage_bytes("fp32", (32, 16, 3, 3), 32, True) == 4 * 4608 + 4 * 32
    assert storage_bytes("int8", (32, 16, 3, 3), 32, True) == 4608 + 5 * 32 + 8 * 32
    assert storage_bytes("int4-cast", (32, 16, 3, 3), 32, True) == 2304 + 5 * 32 + 8 * 32
    assert storage_bytes("int2-cast", (32, 16, 3, 3), 32, True) == 1152 + 5 * 32 + 8 * 32
    assert storage_bytes("int2-cast", (3, 3), 3, False) == 3 + 5 * 3  # 9 codes: ⌈9/4⌉ bytes
    # 3 bytes per 8 codes (⌈4608/8⌉ groups) and the 4-D shape as int64
    assert storage_bytes("int3-cast", (32, 16, 3, 3), 32, True) == 1728 + 32 + 5 * 32 + 8 * 32
    assert storage_bytes("int3-cast", (3, 3), 3, False) == 6 + 16 + 5 * 3  # 9 codes: 2 groups
    # goal size: float16 scales, no zero point (a Gemm keeps its int8 one), int32 bias and one float32 s_x
    assert storage_bytes("int4-cast", (32, 16, 3, 3), 32, True, compact=Compact(2, 0)) == 2304 + 2 * 32 + 4 * 32 + 4
    assert storage_bytes("int8", (24, 80), 24, True, compact=Compact(2, 1)) == 1920 + 3 * 24 + 4 * 24 + 4
    assert storage_bytes("int8", (24, 80), 24, False, compact=Compact(4, 0)) == 1920 + 4 * 24
    # a [K=80, N=24] MatMul in blocks of 32: 3 blocks per column
    assert storage_bytes("int4-blocks", (80, 24), 24, False) == 960 + 2 * 3 * 24  # float16 scales
    with pytest.raises(ValueError, match="unknown encoding"):
        storage_bytes("int3", (4, 4), 4, False)


def test_cost_table_measures_every_encoding(rng):
    state = onnxptq.planned_state(cnn(rng), {"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}, w_bits=4)
    rows = {r["node"]: r for r in cost_table(state, runs=3)}
    assert set(rows["conv2"]["latency_ms"]) == set(encodings_for("Conv")) == set(ENCODINGS) - {"int4-blocks"}
    assert set(rows["fc"]["latency_ms"]) == set(ENCODINGS)
    assert all(t > 0 for r in rows.values() for t in r["latency_ms"].values())
    assert rows["conv2"]["bytes"]["int4-cast"] < rows["conv2"]["bytes"]["int8"] < rows["conv2"]["bytes"]["fp32"]
    assert rows["conv1"]["planned"] == "int8" and rows["conv2"]["planned"] == "int8"
