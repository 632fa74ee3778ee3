"""Compilation targets: what the runtime's integer kernels can compute exactly.

``ort-cpu`` resolves to the host: x86 CPUs without VNNI multiply u8 activations by s8 weights with
``vpmaddubsw``, which sums adjacent products into a *saturating* int16, so 255·(127 + 127) = 64770
overflows and unconstrained 8-bit weights give wrong results. There, weights keep [−127, 127] but are
*pair-safe*: each channel's scale is raised until every adjacent pair of codes in the kernel's
reduction order has same-sign parts summing within ±128 (255·128 = 32640 ≤ 32767), see
``kernels/saturation.py``. CPUs with VNNI (or AMX), and ARM, accumulate in int32 and need no constraint.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from onnxptq.errors import InputError


@dataclass(frozen=True)
class Target:
    """``weight_qmax8``: code range of 8-bit weights; ``int16_pairs``: u8×s8 products are summed in
    saturating int16 pairs, so 8-bit weight grids must be pair-safe."""

    name: str
    weight_qmax8: int
    int16_pairs: bool
    description: str


TARGETS = {
    "ort-cpu-avx2": Target("ort-cpu-avx2", 127, True,
                           "onnxruntime CPU, x86 without VNNI: 8-bit weights with pair-safe scales, exact "
                           "on every x86 CPU"),
    "ort-cpu-vnni": Target("ort-cpu-vnni", 127, False,
                           "onnxruntime CPU with int32 dot products (x86 VNNI/AMX, ARM): full 8-bit weights"),
}
TARGET_NAMES = ("ort-cpu", *TARGETS)


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
    """The concrete target for ``name``; ``ort-cpu`` picks by the host CPU."""
    if name == "ort-cpu":
        return TARGETS["ort-cpu-vnni" if host_has_int32_dot() else "ort-cpu-avx2"]
    if name not in TARGETS:
        raise InputError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    return TARGETS[name]
