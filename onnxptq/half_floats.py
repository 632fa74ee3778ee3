"""Float constants stored as float16 in a file written under a byte budget.

Past its quantized weights, a model holds float32 constants that float ops read: LayerNorm's γ and β,
the bias of a blocked int4 MatMul (MatMulNBits adds it in float), the weights of a layer the budget
keeps float. Under goal ``size`` the compile stores each such initializer of at least ``HALF_MIN``
values as float16 behind a ``Cast`` to float, which onnxruntime folds at load (as it folds the Cast of
packed codes and float16 scales), so the kernels read float32 as before and the file holds half the
bytes. In magika's uniform packed 4-bit file these were 7 kB (three [512] vectors of its LayerNorm and
the head's bias): 1.6% of the file, more than a budget of 0.13× leaves under uniform 4-bit.

Rounding to float16 moves a value x by at most 2⁻¹¹·|x| in float16's normal range and by at most 2⁻²⁵
below it (|x| < 2⁻¹⁴), against the 2⁻⁴ of a 4-bit step; a constant with a value float16 cannot hold
(|x| > 65504, infinities, NaN: an attention mask's −1e9) stays float32. Constants read by a
QuantizeLinear or DequantizeLinear stay as they are: a scale's type is the DequantizeLinear's output
type, and they are scalars or already float16. A Cast node costs ≈ 30 bytes, so a constant of fewer
than ``HALF_MIN`` values is left float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

HALF_MIN = 32  # values: the Cast node (≈ 30 bytes) is paid back from 16 values on, with a margin
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_HALF = np.finfo(np.float16)


def half_bytes(n: int) -> int:
    """Bytes ``n`` float values take in a file written under goal ``size``: 2 per value from
    ``HALF_MIN`` on, else 4 (the Cast node itself is not counted)."""
    return 2 * n if n >= HALF_MIN else 4 * n


def halvable(values: np.ndarray) -> bool:
    """Whether float32 ``values`` are stored as float16: at least ``HALF_MIN`` of them, all finite and
    within float16's range."""
    return values.size >= HALF_MIN and bool(np.all(np.abs(values) <= _HALF.max))


def half_floats(model: onnx.ModelProto) -> None:
    """Store ``model``'s float32 initializers that only non-Q/DQ ops read, where ``halvable``, as float16
    followed by a Cast to float that keeps the old name (in place; the nodes are inserted first, a
    constant has no producer to follow)."""
    graph = model.graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    kept = {v.name for v in graph.output} | {v.name for v in graph.input}  # an input may override it
    casts = []
    for init in graph.initializer:
        ops = readers.get(init.name, set())
        if init.data_type != onnx.TensorProto.FLOAT or not ops or ops & _QDQ or init.name in kept:
            continue
        values = numpy_helper.to_array(init)
        if not halvable(values):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}_f16"))
        casts.append(onnx.helper.make_node("Cast", [init.name], [name], to=onnx.TensorProto.FLOAT))
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
