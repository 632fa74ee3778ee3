"""Compilation targets: what the runtime's integer kernels can compute exactly.

``ort-cpu`` resolves to the host: x86 CPUs without VNNI multiply u8 activations by s8 weights with
``vpmaddubsw``, which sums adjacent products into a *saturating* int16, so 255·(127 + 127) = 64770
overflows and unconstrained 8-bit weights give wrong results. There, weights keep [−127, 127] but are
*pair-safe*: each channel's scale is raised until every adjacent pair of codes in the kernel's
reduction order has same-sign parts summing within ±128 (255·128 = 32640 ≤ 32767), see
``kernels/saturation.py``. CPUs with VNNI (or AMX), and ARM, accumulate in int32 and need no constraint.

Each profile also says how layers below 8 bits are *encoded* (``goal``):

* ``speed`` (``ort-cpu``, ``ort-cpu-avx2``, ``ort-cpu-vnni``): 4-bit semantics on int8 kernels. Weights
  are int8 initializers holding codes in [−7, 7] (3-bit [−3, 3], 2-bit [−1, 1]) on QLinearConv / QGemm /
  QLinearMatMul; 4-bit activations are uint8 codes capped at 15 (``passes/emission.py``). The file stores a
  byte per weight; latency is that of the 8-bit build.
* ``size`` (``ort-cpu-size``): sub-8-bit weights stored packed, two int4 codes per byte. MatMul/Gemm
  become int4 blocks along K (MatMulNBits, float activations); Conv stores int4 codes behind a Cast to
  int8 that onnxruntime constant-folds at load, so it still runs on QLinearConv (DequantizeLinear of
  int4 straight into a Conv has no integer kernel and runs 1.3–1.9× slower than fp32). 2-bit codes of
  any layer are int2, four per byte, behind the same Cast (opset 25), and 3-bit codes eight per three
  bytes behind an unpacking function (``onnxptq/int3.py``), both folded at load, on the int8 kernels.
* ``generic`` (``generic-qdq``): plain opset-21 QDQ for other runtimes (TensorRT, QNN, …). It
  guarantees: the model is opset 21 (IR version ≥ 10) at every bit width and passes
  ``onnx.checker`` (full check); its only quantization ops are standard-domain QuantizeLinear /
  DequantizeLinear (no com.microsoft op, no Cast or Clip on codes); activations are uint8 (uint4
  at ``--a-bits 4``) with one (scale, zero point) per tensor; weights are int8 in [−127, 127] per
  output channel, or int4 per output channel below 8 bits, zero point 0 (lookup tables int8 per
  column); biases int32 at s_x·s_w, zero point 0. So the model means the same under any conforming
  ONNX evaluator, up to the float rounding of the ops between DQ and Q (``onnx.reference`` gives
  onnxruntime's unoptimized outputs on the test models, ``tests/test_target.py``; on
  EfficientNet-Lite0 the logits differ by up to 0.11 of 9.3 at W8A8 and 0.19 of 6.2 at W4A8 on two
  images, rounding flips propagating through 50 weighted layers).
  Full-range 8-bit weights assume int32 accumulation: on x86 without VNNI onnxruntime's own u8×s8
  kernels may saturate them. onnxruntime's CPU optimizer cannot fuse (and mis-rewrites) uint4
  activations, so such models are verified unoptimized and fusion coverage is not applicable.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from pathlib import Path

from onnxptq.errors import InputError


@dataclass(frozen=True)
class Target:
    """``weight_qmax8``: code range of 8-bit weights; ``int16_pairs``: u8×s8 products are summed in
    saturating int16 pairs, so 8-bit weight grids must be pair-safe; ``goal``: how sub-8-bit layers are
    encoded (``speed``, ``size`` or ``generic``, see above)."""

    name: str
    weight_qmax8: int
    int16_pairs: bool
    description: str
    goal: str = "speed"

    @property
    def fused(self) -> bool:
        """Whether the model is meant for onnxruntime's CPU integer kernels (fusion coverage applies)."""
        return self.goal != "generic"


TARGETS = {
    "ort-cpu-avx2": Target("ort-cpu-avx2", 127, True,
                           "onnxruntime CPU, x86 without VNNI: 8-bit weights with pair-safe scales, exact "
                           "on every x86 CPU"),
    "ort-cpu-vnni": Target("ort-cpu-vnni", 127, False,
                           "onnxruntime CPU with int32 dot products (x86 VNNI/AMX, ARM): full 8-bit weights"),
    "generic-qdq": Target("generic-qdq", 127, False,
                          "plain opset-21 QDQ with int4/uint4 tensors below 8 bits, for runtimes other than "
                          "onnxruntime's CPU provider", goal="generic"),
}
TARGET_NAMES = ("ort-cpu", "ort-cpu-size", *TARGETS)


def host_has_int32_dot(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether this CPU's u8×s8 kernels accumulate without int16 saturation."""
    machine = (machine or platform.machine()).lower()
    if machine not in {"x86_64", "amd64", "i386", "i686"}:
        return True
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_target(name: str) -> Target:
    """The concrete target for ``name``; ``ort-cpu`` and ``ort-cpu-size`` pick by the host CPU."""
    if name in ("ort-cpu", "ort-cpu-size"):
        host = TARGETS["ort-cpu-vnni" if host_has_int32_dot() else "ort-cpu-avx2"]
        if name == "ort-cpu":
            return host
        return replace(host, name=f"{host.name}-size", goal="size",
                       description=host.description + "; sub-8-bit weights stored packed as int4 (int3, int2 at 3, 2 bits)")
    if name not in TARGETS:
        raise InputError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    return TARGETS[name]
