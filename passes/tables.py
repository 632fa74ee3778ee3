"""Lookup tables: constant embedding tables read by Gather are stored as int8 codes.

A Gather whose data is a constant float matrix T [V, D] (axis 0, computed indices) looks up rows of
a table that can dwarf the rest of the model (MiniLM's 30522×384 word embeddings are half its file).
Stored as int8 codes with one symmetric scale per column, s_d = range(T[:, d]) / 127 (min-max or
MSE clip search, ``--weight-method``), the Gather moves codes and one DequantizeLinear along the last
axis restores T̂[v, d] = q[v, d]·s_d for the rows looked up: 4× smaller, no full-table dequantization
per run. Per column rather than per row because a per-row scale would need its own lookup, which no
standard DequantizeLinear expresses. Tables shared with another node (tied weights) stay float.
"""

from __future__ import annotations

import numpy as np

from onnxptq.graph import attr, const
from onnxptq.kernels.quant import channel_rows, row_scales
from onnxptq.passes.select import excluded
from onnxptq.plan import TablePlan
from onnxptq.state import CompileState

QMAX = 127


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
            scale = row_scales(channel_rows(table, 1), QMAX, state.options.weight_method)
            tables[node.name] = TablePlan(node=node.name, name=data.name, table=table, scale=scale, qmax=QMAX)
        if tables:
            n = sum(t.table.size for t in tables.values())
            state.report.note(self.name, f"{len(tables)} Gather tables ({n:,} values) stored as int8, "
                                         "one scale per column")
