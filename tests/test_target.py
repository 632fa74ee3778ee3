import numpy as np
import pytest

from onnxptq.errors import InputError
from onnxptq.target import TARGETS, host_has_int32_dot, resolve_target


def pairwise_int16_dot(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """u8·s8 dot products as vpmaddubsw computes them: adjacent products summed into saturating int16,
    then widened and accumulated exactly."""
    prod = a_u8.astype(np.int32) * w_s8.astype(np.int32)
    pairs = np.clip(prod[..., 0::2] + prod[..., 1::2], -32768, 32767)
    return pairs.sum(axis=-1)


@pytest.mark.parametrize("name,exact", [("ort-cpu-avx2", True), ("ort-cpu-vnni", False)])
def test_avx2_weight_range_cannot_saturate_int16_pairs(rng, name, exact):
    qmax = TARGETS[name].weight_qmax8
    a = rng.integers(200, 256, size=(64, 32)).astype(np.uint8)  # worst case: large activations
    w = np.full((64, 32), qmax, np.int8) * rng.choice([1, 1, 1, -1], size=(64, 32)).astype(np.int8)
    exact_dot = (a.astype(np.int64) * w).sum(axis=-1)
    assert np.array_equal(pairwise_int16_dot(a, w), exact_dot) == exact


def test_host_detection_reads_cpu_flags():
    assert host_has_int32_dot("flags\t\t: fpu avx2 avx512_vnni\n", "x86_64")
    assert host_has_int32_dot("flags\t\t: fpu avx2 avx_vnni\n", "x86_64")
    assert not host_has_int32_dot("flags\t\t: fpu sse4_2 avx2 fma\n", "x86_64")
    assert host_has_int32_dot("", "aarch64")


def test_resolve_target():
    assert resolve_target("ort-cpu-avx2").weight_qmax8 == 64
    assert resolve_target("ort-cpu").name in TARGETS
    with pytest.raises(InputError, match="unknown target"):
        resolve_target("tpu")
