"""3-bit codes packed eight per three bytes (``onnxptq/int3.py``): the byte layout, and the unpacking
function as onnx's reference evaluator and onnxruntime run it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxptq import int3, runtime


def test_pack_writes_base_8_digits_little_endian():
    # u_j = q_j + 4 = j: the word is Σ j·8ʲ, its low byte first
    v = sum(j * 8**j for j in range(8))
    np.testing.assert_array_equal(int3.pack(np.arange(8) - 4), [[v & 0xFF, (v >> 8) & 0xFF, v >> 16]])
    # nine codes: a second group, padded with u = 0
    np.testing.assert_array_equal(int3.pack(np.full(9, 3)), [[255, 255, 255], [7, 0, 0]])


@pytest.mark.parametrize("shape", [(8,), (3, 5, 7), (6, 16, 3, 3), (1,)])
def test_unpack_inverts_pack(rng, shape):
    codes = rng.integers(-4, 4, size=shape).astype(np.int8)
    packed = int3.pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == (-(-codes.size // 8), 3)
    np.testing.assert_array_equal(int3.unpack(packed, shape), codes)


def test_pack_refuses_codes_outside_three_bits():
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        int3.pack(np.array([0, 4]))


@pytest.mark.parametrize("shape", [(3, 5, 7), (16, 8, 3, 3)])
def test_the_function_unpacks_what_pack_wrote_on_both_evaluators(rng, shape):
    codes = rng.integers(-4, 4, size=shape).astype(np.int8)
    node = helper.make_node(int3.FUNCTION, ["packed", "shape"], ["codes"], domain=int3.DOMAIN)
    add = helper.make_node("Add", ["codes", "zero"], ["y"])  # a graph input keeps onnxruntime from folding it all away
    graph = helper.make_graph([node, add], "g", [helper.make_tensor_value_info("zero", TensorProto.INT8, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, list(shape))],
                              [numpy_helper.from_array(int3.pack(codes), "packed"),
                               numpy_helper.from_array(np.array(shape, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(int3.DOMAIN, 1)],
                              functions=[int3.function(21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    feed = {"zero": np.array(0, np.int8)}
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, feed)[0], codes)
    np.testing.assert_array_equal(runtime.session(model).run(None, feed)[0], codes)
