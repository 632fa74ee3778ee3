"""Lookup tables: constant embedding tables read by Gather are stored as int8 (or int4) codes.

A Gather whose data is a constant float matrix T [V, D] (axis 0, computed indices) looks up rows of
a table that can dwarf the rest of the model (MiniLM's 30522×384 word embeddings are half its file).
Stored as b-bit codes with one asymmetric grid per column (scale s_d and zero point z_d over all 2^b
codes, min-max or MSE clip search, ``--weight-method``; ``kernels.quant.affine_rows``), the Gather moves
codes and one DequantizeLinear along the last axis restores T̂[v, d] = (q[v, d] − z_d)·s_d for the rows
looked up: no full-table dequantization per run. Per column rather than per row because a per-row scale
would need its own lookup, which no standard DequantizeLinear expresses. Tables shared with another node (tied weights)
stay float.

This pass plans every table at 8 bits (4× smaller than float); mixed precision may choose 4, 3 or 2
bits (``fit_table``), stored packed two (int4) or four (int2, opset 25) codes per byte and Cast to int8
before the Gather, or eight per three bytes behind ``onnxptq/int3.py``'s unpacking function —
onnxruntime folds either at load, so the file holds 8×, 10⅔× or 16× less than float and the lookup
runs on int8. At 2 bits a column has four levels (codes −2 … 1): MiniLM-L6's word
embeddings (half its weights) fake-quantized so keep a mean output cosine of 0.974 to fp32 (MSE range;
on a symmetric grid, three levels, 0.907), a loss the integer program weighs against 2-bit layers.
"""

from __future__ import annotations

import numpy as np

from onnxptq.graph import attr, const
from onnxptq.kernels.quant import affine_rows, channel_rows, symmetric_qmax
from onnxptq.passes.select import excluded
from onnxptq.plan import TablePlan
from onnxptq.state import CompileState

TABLE_BITS = (8, 4, 3, 2)  # the widths a table can be stored at


def fit_table(node: str, name: str, table: np.ndarray, bits: int, method: str) -> TablePlan:
    """The plan of table ``name`` [V, D] read by Gather ``node`` at ``bits`` (one of ``TABLE_BITS``):
    its per-column scales and zero points fitted by ``method``."""
    if bits not in TABLE_BITS:
        raise ValueError(f"a table is stored at {TABLE_BITS} bits, not {bits}")
    qmax = symmetric_qmax(bits)
    scale, zero_point = affine_rows(channel_rows(table, 1), -qmax - 1, qmax, method)
    return TablePlan(node=node, name=name, table=table, scale=scale, zero_point=zero_point, bits=bits)


class TablePass:
    name = "tables"

    def run(self, state: CompileState) -> None:
        skipped = excluded(state.options.exclude)
        tables = state.plan.tables
        for node in state.model.graph:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or skipped(node):
                continue
            data, indices = node.inputs[0], node.inputs[1]
            table = const(data)
            if table is None or table.dtype != np.float32 or table.ndim != 2 or attr(node, "axis", 0) not in (0, -2) \
                    or const(indices) is not None or len(data.uses()) != 1:
                continue
            tables[node.name] = fit_table(node.name, data.name, table, 8, state.options.weight_method)
        if tables:
            n = sum(t.table.size for t in tables.values())
            state.report.note(self.name, f"{len(tables)} Gather tables ({n:,} values) stored as int8, "
                                         "one scale per column")
