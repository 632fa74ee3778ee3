"""3-bit weight codes packed eight per three bytes, and the ONNX function that unpacks them at load.

ONNX has int4 and int2 tensors but no int3, so a 3-bit grid stored as int4 costs as much as a 4-bit
one and a size budget never picks it. Here the codes q ∈ [−4, 3] of a tensor of n weights are stored
as uint8 [⌈n/8⌉, 3]: with u = q + 4 ∈ [0, 7], padded with u = 0 to a multiple of 8 codes,
group g holds the 24-bit word

    v_g = Σ_{j<8} u_{8g+j} · 8ʲ,   stored little-endian as bytes (v_g mod 2⁸, ⌊v_g/2⁸⌋ mod 2⁸, ⌊v_g/2¹⁶⌋).

``Int3ToInt8(packed, shape)`` (domain ``onnxptq``, a model-local function of standard ops) inverts it:
v = b₀ | b₁≪8 | b₂≪16 in uint32, u_j = (v ≫ 3j) & 7, q = int8(u) − 4, the first ∏shape codes reshaped
to ``shape``. Its inputs are initializers, so onnxruntime inlines the function and folds it to an int8
constant at load, as it folds the Cast of packed int4: the DequantizeLinear it feeds still fuses into
QLinearConv / QGemm / QLinearMatMul (``tests/test_mixed.py``). The function takes 3/8 byte a weight in
the file, plus one node and a shape per layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "onnxptq"
FUNCTION = "Int3ToInt8"
LOW, HIGH = -4, 3
_PER_GROUP = 8  # codes in one 24-bit word


def pack(codes: np.ndarray) -> np.ndarray:
    """uint8 [⌈n/8⌉, 3] holding the integer ``codes`` (each in [−4, 3]) in C order."""
    q = np.asarray(codes).reshape(-1).astype(np.int64)
    if q.size and (q.min() < LOW or q.max() > HIGH):
        raise ValueError(f"3-bit codes must lie in [{LOW}, {HIGH}]; got [{q.min()}, {q.max()}]")
    u = np.zeros(-(-q.size // _PER_GROUP) * _PER_GROUP, np.uint32)
    u[:q.size] = q - LOW
    words = (u.reshape(-1, _PER_GROUP) << (3 * np.arange(_PER_GROUP, dtype=np.uint32))).sum(1, dtype=np.uint32)
    return np.stack([(words >> (8 * i)) & 0xFF for i in range(3)], axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """int8 codes of ``shape`` from ``pack``'s bytes (what ``Int3ToInt8`` computes)."""
    b = np.asarray(packed, np.uint32)
    words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    u = (words[:, None] >> (3 * np.arange(_PER_GROUP, dtype=np.uint32))) & 7
    n = int(np.prod(shape, dtype=np.int64))
    return (u.reshape(-1)[:n].astype(np.int8) + np.int8(LOW)).reshape(shape)


def function(opset: int) -> onnx.FunctionProto:
    """The ``Int3ToInt8(packed, shape) → codes`` function for a model of default-domain ``opset`` ≥ 18
    (BitwiseAnd, Split's ``num_outputs``; a function must import the model's version), of ops that
    onnxruntime's CPU provider folds for uint32."""

    def const(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))

    nodes = [
        const("byte_shift", np.array([0, 8, 16], np.uint32)),
        const("code_shift", (3 * np.arange(_PER_GROUP)).astype(np.uint32)),
        const("mask", np.array(7, np.uint32)),
        const("offset", np.array(-LOW, np.int8)),
        const("flat", np.array([-1], np.int64)),
        const("zero", np.array([0], np.int64)),
        helper.make_node("Cast", ["packed"], ["bytes32"], to=TensorProto.UINT32),
        helper.make_node("BitShift", ["bytes32", "byte_shift"], ["shifted"], direction="LEFT"),
        helper.make_node("Split", ["shifted"], ["b0", "b1", "b2"], axis=1, num_outputs=3),
        helper.make_node("BitwiseOr", ["b0", "b1"], ["b01"]),
        helper.make_node("BitwiseOr", ["b01", "b2"], ["words"]),
        helper.make_node("BitShift", ["words", "code_shift"], ["spread"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["spread", "mask"], ["unsigned"]),
        helper.make_node("Cast", ["unsigned"], ["unsigned8"], to=TensorProto.INT8),
        helper.make_node("Sub", ["unsigned8", "offset"], ["signed"]),
        helper.make_node("Reshape", ["signed", "flat"], ["padded"]),
        helper.make_node("ReduceProd", ["shape"], ["count"], keepdims=1),
        helper.make_node("Slice", ["padded", "zero", "count"], ["codes_flat"]),
        helper.make_node("Reshape", ["codes_flat", "shape"], ["codes"]),
    ]
    return helper.make_function(DOMAIN, FUNCTION, ["packed", "shape"], ["codes"], nodes,
                                [helper.make_opsetid("", opset)])
