"""Bytes a layer's weight and bias take in the emitted file, by weight storage (what emission writes).

For a weight of E entries with M output channels (and, if any, a bias of M entries):

* float (layer kept float):   4·E weight,                         4·M float bias;
* ``int8`` per channel:       E codes + 4·M scales + M int8 zero points,
                              bias int32 codes + 4·M scales + 4·M int32 zero points (12·M);
* ``int4`` blocked along K:   ⌈E/2⌉ packed codes + 4·⌈K/block⌉·M scales (no zero point),
                              4·M float bias (MatMulNBits reads a float input, so the bias stays float).

Only tensor payloads are counted: names, node and tensor headers are a few dozen bytes per tensor, which
the caller measures once on an emitted model. A new storage adds one branch here.
"""

from __future__ import annotations

import math

from onnxptq.plan import WeightGrid

FLOAT_BYTES = 4


def stored_bytes(entries: int, channels: int, grid: WeightGrid | None, bias: bool) -> int:
    """Payload bytes of a layer's weight (``entries`` values, ``channels`` output channels) and, if
    ``bias``, its bias, stored on ``grid`` (None: kept float)."""
    if grid is None:
        return FLOAT_BYTES * (entries + (channels if bias else 0))
    if grid.storage == "int8":
        return entries + (FLOAT_BYTES + 1) * channels + (3 * FLOAT_BYTES * channels if bias else 0)
    if grid.storage == "int4":
        blocks = math.ceil(entries // channels / grid.block_size)
        return math.ceil(entries / 2) + FLOAT_BYTES * blocks * channels + (FLOAT_BYTES * channels if bias else 0)
    raise ValueError(f"no byte count for weight storage {grid.storage!r}")
