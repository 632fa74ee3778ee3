import pytest

from onnxptq.errors import InputError
from onnxptq.target import TARGETS, host_has_int32_dot, resolve_target


def test_only_the_avx2_target_needs_pair_safe_weights():
    assert TARGETS["ort-cpu-avx2"].int16_pairs and not TARGETS["ort-cpu-vnni"].int16_pairs
    assert TARGETS["ort-cpu-avx2"].weight_qmax8 == TARGETS["ort-cpu-vnni"].weight_qmax8 == 127


def test_host_detection_reads_cpu_flags():
    assert host_has_int32_dot("flags\t\t: fpu avx2 avx512_vnni\n", "x86_64")
    assert host_has_int32_dot("flags\t\t: fpu avx2 avx_vnni\n", "x86_64")
    assert not host_has_int32_dot("flags\t\t: fpu sse4_2 avx2 fma\n", "x86_64")
    assert host_has_int32_dot("", "aarch64")


def test_resolve_target():
    assert resolve_target("ort-cpu-avx2").int16_pairs
    assert resolve_target("ort-cpu").name in TARGETS
    with pytest.raises(InputError, match="unknown target"):
        resolve_target("tpu")
