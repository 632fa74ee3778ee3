"""Pure numpy numerics of onnxptq: quantization grids, range selection, statistics.

Nothing here touches a graph or a file; every function maps arrays to arrays, so each can be tested
against a direct numpy reference.
"""
