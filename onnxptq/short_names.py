"""Short value names for a file written under a byte budget.

An ONNX file stores a value's name where the value is produced and again at every use, and Q/DQ
emission derives its names from the source's (``<tensor>_quantized``, ``<tensor>_scale``, …). Exporters
write long paths: in magika's 0.13× file (374 kB) the names of nodes and values took 35 kB, nine
hundredths of the budget, bytes the weights could have had. Under goal ``size`` the compile therefore
writes every value that is not a graph input or output as ``_`` and its index in base 36 (in order of
first appearance, so the same model gives the same names), and keeps node names only for the nodes
the plan quantizes (its layers and ops): verification finds their kernels by name, and the report
names them. Everything else about
the model is unchanged; a graph with a subgraph attribute (If, Loop, Scan), whose body may name outer
values, is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx


def shorten_names(model: onnx.ModelProto, keep_nodes: set[str]) -> None:
    """Rename ``model``'s values in place as the module doc says; node names not in ``keep_nodes`` are
    cleared (ONNX names are optional for nodes)."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    kept = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in kept:
            return name
        if name not in names:
            new = "_" + np.base_repr(len(names), 36).lower()
            while new in kept:  # a graph input or output already spelled like a short name
                new += "_"
            names[name] = new
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = short(sparse.values.name)
    for node in graph.node:
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(y) for y in node.output]
        if node.name not in keep_nodes:
            node.name = ""
    for info in graph.value_info:
        info.name = short(info.name)
