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


@pytest.mark.parametrize("options", [{}, {"w_bits": 4}, {"w_bits": 4, "a_bits": 4}], ids=["W8A8", "W4A8", "W4A4"])
def test_generic_qdq_is_plain_opset21_qdq(rng, options):
    """generic-qdq's guarantees (onnxptq/target.py): opset 21 at every bit width, the full checker
    passes, standard-domain Q/DQ only (no Cast/Clip on codes), full-range int8 or int4 per-channel
    weights with zero point 0, uint8/uint4 activations; onnx.reference computes what onnxruntime does."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx.reference import ReferenceEvaluator

    import onnxptq
    from conftest import cnn
    from onnxptq.runtime import session

    x = rng.standard_normal((24, 3, 16, 16)).astype(np.float32)
    q = onnxptq.compile(cnn(rng), {"x": x[:20]}, target="generic-qdq", first_last_8bit=False, **options).model
    assert next(o.version for o in q.opset_import if o.domain == "") == 21 and q.ir_version >= 10
    onnx.checker.check_model(q, full_check=True)
    assert {n.domain for n in q.graph.node} == {""}
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    assert not [n.name for n in q.graph.node if n.op_type in ("Cast", "Clip")
                and producer.get(n.input[0]) == "QuantizeLinear"], "no op on the codes between Q and DQ"
    inits = {i.name: i for i in q.graph.initializer}
    weight = TensorProto.INT8 if not options else TensorProto.INT4
    act = TensorProto.UINT4 if options.get("a_bits") == 4 else TensorProto.UINT8
    for name in ("w1", "w2", "wf"):
        assert inits[f"{name}_quantized"].data_type == weight
        assert not numpy_helper.to_array(inits[f"{name}_zero_point"]).any()
    assert not options or np.abs(numpy_helper.to_array(inits["w2_quantized"]).astype(int)).max() <= 8
    if not options:
        assert np.abs(numpy_helper.to_array(inits["w1_quantized"])).max() == 127, "full range: int32 accumulation"
    assert inits["r1_zero_point"].data_type == act
    ref = ReferenceEvaluator(q).run(None, {"x": x[20:]})[0]
    np.testing.assert_allclose(session(q, level="basic").run(None, {"x": x[20:]})[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vnni", [False, True])
def test_corrections_measure_on_integer_kernels_only_where_exact_and_fusable(rng, monkeypatch, vnni):
    """The corrections run onnxruntime's integer kernels only for targets meant for them and exact on
    this host; a generic-qdq plan (uint4 activations at --a-bits 4, which onnxruntime's optimizer
    mis-rewrites) is measured on float QDQ whatever the CPU."""
    import numpy as np

    import onnxptq.passes.layer_moments as layer_moments
    from conftest import cnn
    from onnxptq.api import planned_state

    monkeypatch.setattr(layer_moments, "host_has_int32_dot", lambda: vnni)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    levels = {target: layer_moments.integer_level(planned_state(cnn(rng), {"x": x}, target=target))
              for target in ("ort-cpu-avx2", "ort-cpu-vnni", "generic-qdq")}
    assert levels == {"ort-cpu-avx2": "all", "ort-cpu-vnni": "all" if vnni else "basic", "generic-qdq": "basic"}
