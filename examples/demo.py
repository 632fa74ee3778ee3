"""The README's first command: compile EfficientNet-Lite0 (real ImageNet weights) with the CLI, then
print its benchmark rows next to onnxruntime's own quantize_static.

    python -m examples.demo
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from examples.common import CACHE
from examples.efficientnet_lite0 import example


def main() -> int:
    work = CACHE / "demo"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = example.fp32_model()
    calib = work / "calib.npz"
    np.savez(calib, **example.calibration_set(64))
    print(f"$ onnxptq compile {fp32.name} --calib {calib.name} -o efficientnet_lite0.q.onnx", flush=True)
    code = subprocess.call([sys.executable, "-m", "onnxptq.cli", "compile", str(fp32), "--calib", str(calib),
                            "-o", str(work / "efficientnet_lite0.q.onnx"), "--json", str(work / "report.json")])
    if code != 0:
        return code
    print("\nBenchmark rows (20 labelled ImageNet photos + 240 natural-image crops; latency at 1 thread):", flush=True)
    return subprocess.call([sys.executable, "-m", "benchmarks.run", "--examples", "efficientnet_lite0",
                            "--configs", "onnxptq W8A8,ORT quantize_static MinMax", "--out", str(work)])


if __name__ == "__main__":
    sys.exit(main())
