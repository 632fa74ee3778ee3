"""Cost facts of a layer's encodings: the bytes it stores in the model file, and measured latency.

``storage_bytes`` is the one place that knows what each weight encoding writes (codes, scales, zero
points, bias), for a layer with ``n`` weights in ``C`` output channels (K = n / C inputs each):

=============  ==============================================================  =====================
encoding       initializers                                                    bytes
=============  ==============================================================  =====================
``fp32``       float weight and bias; goal ``size``: float16 behind a Cast      4n + 4C
               (``onnxptq/half_floats.py``: h(m) = 2m from 32 values, else 4m)  h(n) + h(C)
``int8``       int8 codes (any width ≤ 8 bits), f32 scale + int8 zero point    n + 5C + 8C
               per channel; int32 bias with its f32 scale (no zero point: 0);
               goal ``size``: f16 scale, no zero point (a Gemm's int8), the     n + 2C + 4C + 4
               bias step the product of the stored s_w and a scalar s_x        (Gemm: + C)
``int4-cast``  int4 codes packed two per byte, Cast to int8 at load (goal      ⌈n/2⌉ + 2C + 4C + 4
               ``size``, Conv; scales and bias as ``int8`` under ``size``)
``int2-cast``  int2 codes packed four per byte, Cast to int8 at load (goal     ⌈n/4⌉ + 2C + 4C + 4
               ``size``, 2-bit codes of any layer)
``int3-cast``  3-bit codes eight per three bytes and the int64 shape, unpacked  3⌈n/8⌉ + 8r + 2C +
               to int8 at load (``onnxptq/int3.py``; goal ``size``, 3-bit codes  4C + 4
               of any layer, r the weight's rank)
``int4-qdq``   int4 codes and int4 zero points (goal ``generic``)              ⌈n/2⌉ + 4C + ⌈C/2⌉ + 8C
``int4-blocks``int4 codes in blocks of B along K, one f16 scale per block and  ⌈n/2⌉ + 2·⌈K/B⌉·C + 4C
               column (f32 if one is outside f16's normal range), float bias
               (MatMulNBits); goal ``size``: the bias h(C)
=============  ==============================================================  =====================

(the bias terms only when the layer has a bias; under goal ``size`` a scale is 4 bytes where one of
the layer's is outside float16's normal range). ``layer_latency`` measures what a layer costs in
each encoding on this host: the layer alone, cut out of the fused fp32 graph, emitted by the same
``emission.emit_model`` as a compile, run by onnxruntime at ORT_ENABLE_ALL on one thread on its
real input (one calibration sample), every encoding timed interleaved (``onnxptq.latency``).
``int8-a4`` is ``int8`` with the layer's input on a 4-bit grid (``--a-bits 4``; the capped encoding
of ``passes/emission.py``), so its difference to ``int8`` is the cost of the cap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from onnxptq import int3, runtime
from onnxptq.half_floats import half_bytes
from onnxptq.kernels.quant import block_rows, channel_rows, row_scales, symmetric_qmax
from onnxptq.latency import interleaved_latency
from onnxptq.passes.calibration import with_outputs
from onnxptq.passes.emission import emit_model, stored_scale, weight_zero_point
from onnxptq.passes.weights import WeightGridPass
from onnxptq.plan import ActivationPlan, LayerPlan, QuantPlan, TablePlan, WeightGrid
from onnxptq.state import CompileState

ENCODINGS = ("fp32", "int8", "int8-a4", "int4-cast", "int3-cast", "int2-cast", "int4-qdq", "int4-blocks")
_BLOCKED_OPS = ("MatMul", "Gemm")
SHARED_BYTES = {"int3-cast": int3.function(21).ByteSize()}  # model-local function, one copy per file


class Compact(NamedTuple):
    """Goal ``size``'s layout (``emission``): bytes of one per-channel scale (2, float16; 4 where one
    is outside its normal range) and of one weight zero point (0: none; 1 for a Gemm); for ``fp32`` and
    ``int4-blocks`` only its presence counts (their float values stored float16, ``half_floats``)."""

    scale: int
    zero_point: int


def storage_bytes(encoding: str, weight_shape: Sequence[int], channels: int, bias: bool, block_size: int = 32,
                  compact: Compact | None = None) -> int:
    """Bytes a layer's weight (and bias) occupy in the model file under ``encoding`` (table above);
    ``compact`` for the per-channel encodings of goal ``size``."""
    n = int(np.prod(weight_shape))
    c, k = channels, n // channels
    packed = -(-n // 2)
    floats = half_bytes if compact is not None else (lambda m: 4 * m)  # goal ``size``: ``half_floats``
    if encoding == "fp32":
        return floats(n) + (floats(c) if bias else 0)
    codes = {"int8": n, "int8-a4": n, "int4-cast": packed, "int2-cast": -(-n // 4),
             "int3-cast": 3 * -(-n // 8) + 8 * len(weight_shape)}
    if encoding in codes:
        if compact is not None:
            return codes[encoding] + (compact.scale + compact.zero_point) * c + ((4 * c + 4) if bias else 0)
        return codes[encoding] + 5 * c + (8 * c if bias else 0)
    if encoding == "int4-qdq":
        return packed + 4 * c + -(-c // 2) + (8 * c if bias else 0)
    if encoding == "int4-blocks":
        return packed + 2 * -(-k // block_size) * c + (floats(c) if bias else 0)
    raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


def layer_encoding(layer: LayerPlan, goal: str) -> str:
    """The encoding emission writes for ``layer`` under the target's ``goal``."""
    if layer.grid.block_size:
        return "int4-blocks"
    if layer.grid.storage in ("int2", "int3"):
        return f"{layer.grid.storage}-cast"
    if layer.grid.storage == "int4":
        return "int4-qdq" if goal == "generic" else "int4-cast"
    return "int8"


def _planned_encoding(layer: LayerPlan | TablePlan, goal: str) -> str:
    """``layer_encoding``, or a lookup table's: ``int8``, ``int4-cast``, ``int3-cast`` or ``int2-cast``."""
    if isinstance(layer, TablePlan):
        return "int8" if layer.bits == 8 else f"int{layer.bits}-cast"
    return layer_encoding(layer, goal)


def layer_storage_bytes(layer: LayerPlan | TablePlan, goal: str, encoding: str | None = None) -> int:
    """``storage_bytes`` of ``layer`` as planned (or in ``encoding``). A lookup table [V, D] counts as a
    weight of D channels without bias (one scale per column)."""
    encoding = encoding or _planned_encoding(layer, goal)
    if isinstance(layer, TablePlan):
        compact = Compact(0, 0) if goal == "size" and encoding == "fp32" else None  # a float table: float16
        return storage_bytes(encoding, layer.table.shape, layer.table.shape[1], False, compact=compact)
    compact = None
    if goal == "size":
        per_channel = encoding not in ("fp32", "int4-blocks", "int4-qdq")
        zero_point = weight_zero_point(layer, goal) if per_channel else None
        compact = Compact(stored_scale(layer, goal).itemsize if per_channel else 0,
                          0 if zero_point is None else zero_point.itemsize)
    return storage_bytes(encoding, layer.weight.shape, layer.channels, layer.bias is not None,
                         layer.grid.block_size or 32, compact)


def counted_bytes(layer: LayerPlan | TablePlan, goal: str) -> int:
    """``layer_storage_bytes`` plus what the file holds once for every layer in the layer's encoding —
    the unpacking function of int3 (``SHARED_BYTES``) — charged to each such layer: an upper bound by
    (k − 1) copies for k layers, which a size budget can add up layer by layer. (Under 1 kB: on a
    20 kB test model it decides the choice, on a real model it is lost in the payloads.)"""
    return layer_storage_bytes(layer, goal) + SHARED_BYTES.get(_planned_encoding(layer, goal), 0)


def encodings_for(op_type: str) -> tuple[str, ...]:
    """The encodings a layer of ``op_type`` can be emitted in."""
    return tuple(e for e in ENCODINGS if e != "int4-blocks" or op_type in _BLOCKED_OPS)


def _grid(state: CompileState, layer: LayerPlan, encoding: str, k_axis: int) -> WeightGrid:
    """A min-max weight grid of ``layer`` in ``encoding`` (the values do not change the timing), with
    the weights pass's floor that keeps the int32 bias representable."""
    axis = layer.weight_channel_axis
    if encoding == "int4-blocks":
        w_kn = layer.weight if k_axis == 0 else layer.weight.T
        scale = row_scales(block_rows(w_kn, 32), 7, "minmax").reshape(-1, w_kn.shape[1])
        return WeightGrid(bits=4, qmax=7, qmin=-8, axis=k_axis, scale=scale, block_size=32, storage="int4")
    bits, storage = {"int8": (8, "int8"), "int8-a4": (8, "int8"), "int2-cast": (2, "int2"),
                     "int3-cast": (3, "int3")}.get(encoding, (4, "int4"))
    qmax = symmetric_qmax(bits)
    scale = WeightGridPass._bias_safe(state, layer, row_scales(channel_rows(layer.weight, axis), qmax, "minmax"))
    return WeightGrid(bits=bits, qmax=qmax, axis=axis, storage=storage, scale=scale)


def _single_layer(state: CompileState, layer: LayerPlan) -> tuple[ir.Model, dict[str, np.ndarray], np.ndarray]:
    """The fused fp32 graph cut down to ``layer`` alone, its input for one calibration sample, and
    that sample's output."""
    node = next(n for n in state.model.graph if n.name == layer.node)
    out_name = node.outputs[0].name
    sess = runtime.session(with_outputs(state.model, [layer.input_name, out_name]), level="basic")
    feed = {k: v[:1] for k, v in next(state.calib.batches(1)).items()}
    x, y = sess.run([layer.input_name, out_name], feed)
    proto = onnx.utils.Extractor(ir.serde.serialize_model(state.model)).extract_model([layer.input_name], [out_name])
    return ir.serde.deserialize_model(proto), {layer.input_name: x}, y


def layer_latency(state: CompileState, node: str, encodings: Sequence[str] | None = None,
                  runs: int = 20) -> dict[str, float]:
    """Median milliseconds of layer ``node`` (planned in ``state``) in each encoding, on this host."""
    layer = state.plan.layers[node]
    encodings = [e for e in (encodings or encodings_for(layer.op_type)) if e in encodings_for(layer.op_type)]
    single, feed, y = _single_layer(state, layer)
    x = feed[layer.input_name]
    graph_node = next(iter(single.graph))
    transb = graph_node.attributes.get("transB")
    k_axis = 1 if layer.op_type == "Gemm" and transb is not None and transb.value else 0
    out_name = graph_node.outputs[0].name
    sessions = {}
    for encoding in encodings:
        if encoding == "fp32":
            sessions[encoding] = runtime.session(ir.serde.serialize_model(single), threads=1)
            continue
        grid = _grid(state, layer, encoding, k_axis)
        plan = QuantPlan(layers={node: dataclasses.replace(layer, grid=grid, activation_input=not grid.block_size)},
                         ops={node: layer.op_type}, goal="generic" if encoding == "int4-qdq" else "speed")
        if not grid.block_size:
            plan.activations = {
                layer.input_name: ActivationPlan(layer.input_name, bits=4 if encoding == "int8-a4" else 8,
                                                 lo=float(x.min()), hi=float(x.max())),
                out_name: ActivationPlan(out_name, lo=float(y.min()), hi=float(y.max()))}
        model = ir.serde.serialize_model(emit_model(single, plan))
        sessions[encoding] = runtime.session(model, threads=1)
    return interleaved_latency(sessions, feed, runs=runs)


def cost_table(state: CompileState, nodes: Sequence[str] | None = None, runs: int = 20) -> list[dict]:
    """Per planned layer: its parameters, bytes and measured latency in every encoding it can take."""
    rows = []
    names = list(nodes or state.plan.layers)
    for name in state.progress.track(names, "cost facts", len(names)):
        layer = state.plan.layers[name]
        encodings = encodings_for(layer.op_type)
        rows.append({"node": name, "op": layer.op_type, "parameters": int(layer.weight.size),
                     "planned": layer_encoding(layer, state.plan.goal),
                     "bytes": {e: layer_storage_bytes(layer, state.plan.goal, e) for e in encodings},
                     "latency_ms": {e: round(t, 4) for e, t in layer_latency(state, name, encodings, runs).items()}})
    return rows
