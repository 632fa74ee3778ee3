"""What int3 storage costs at load: onnxruntime session creation for a table stored int8 against int3.

    python -m benchmarks.int3_load [--rows 30522] [--cols 384] [--runs 5]

int3 codes (``onnxptq/int3.py``) are unpacked by a function onnxruntime folds into an int8 constant when
the session is created, so the file is 3/8 of int8's and the load does the unpacking once. The default
shape is MiniLM-L6's word-embedding table (11.7 M entries). Each run builds both models (Gather of the
table, as emission writes a 3-bit table) and times their session creation in turn; prints the median
seconds of each, their ratio and the file bytes, and checks that both look up the same codes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxptq import int3, runtime


def table_model(codes: np.ndarray, packed: bool) -> bytes:
    """ids → Gather(codes) → Cast(float), the codes stored int8 or int3."""
    if packed:
        inits = [numpy_helper.from_array(int3.pack(codes), "packed"),
                 numpy_helper.from_array(np.array(codes.shape, np.int64), "shape")]
        nodes = [helper.make_node(int3.FUNCTION, ["packed", "shape"], ["codes"], domain=int3.DOMAIN)]
    else:
        inits, nodes = [numpy_helper.from_array(codes, "codes")], []
    nodes += [helper.make_node("Gather", ["codes", "ids"], ["rows"]),
              helper.make_node("Cast", ["rows"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, codes.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(int3.DOMAIN, 1)],
                              functions=[int3.function(21)] if packed else [], ir_version=10)
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30522)
    parser.add_argument("--cols", type=int, default=384)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    codes = np.random.default_rng(0).integers(int3.LOW, int3.HIGH + 1, (args.rows, args.cols)).astype(np.int8)
    models = {"int8": table_model(codes, False), "int3": table_model(codes, True)}
    ids = np.arange(8, dtype=np.int64)[None]
    seconds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.runs):
        for kind, model in models.items():
            start = time.perf_counter()
            session = runtime.session(model, threads=1)
            seconds[kind].append(time.perf_counter() - start)
            if not np.array_equal(session.run(None, {"ids": ids})[0], codes[:8][None].astype(np.float32)):
                raise SystemExit(f"{kind}: the looked-up codes differ from the table's")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    for kind, model in models.items():
        print(f"{kind}: {len(model):,} bytes, session creation {med[kind]:.3f} s (median of {args.runs})")
    print(f"int3 / int8: {len(models['int3']) / len(models['int8']):.3f}× the bytes, "
          f"+{med['int3'] - med['int8']:.3f} s at load")


if __name__ == "__main__":
    main()
