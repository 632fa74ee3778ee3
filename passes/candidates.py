"""Mixed-precision candidates and budgets: parsing, option checks, and which candidates to measure.

A candidate is a layer's precision — weight bits and activation bits, or float — written ``wNaM`` or
``float`` in ``--candidates``. A budget is one of ``--size-ratio``, ``--bops-ratio``, ``--latency-ratio``, ``--max-drop``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnxptq.errors import InputError
from onnxptq.state import CompileOptions

FLOAT_BITS = 32
WEIGHT_BITS = (8, 4, 3, 2)
ACTIVATION_BITS = (8, 4)
BUDGETS = ("size_ratio", "bops_ratio", "latency_ratio", "max_drop")


@dataclass(frozen=True)
class Candidate:
    """A layer's precision: weight and activation bits, or float (both None)."""

    w_bits: int | None
    a_bits: int | None

    @property
    def label(self) -> str:
        return "float" if self.w_bits is None else f"w{self.w_bits}a{self.a_bits}"

    @property
    def bops_per_mac(self) -> int:
        return (self.w_bits or FLOAT_BITS) * (self.a_bits or FLOAT_BITS)


def parse_candidates(text: str) -> list[Candidate]:
    """``w8a8,w4a8,float`` → candidates; ``w4`` alone means ``w4a8``."""
    found: list[Candidate] = []
    for token in (t.strip().lower() for t in text.split(",")):
        match = re.fullmatch(r"w(\d+)(?:a(\d+))?", token)
        if token == "float":
            cand = Candidate(None, None)
        elif match and int(match[1]) in WEIGHT_BITS and int(match[2] or 8) in ACTIVATION_BITS:
            cand = Candidate(int(match[1]), int(match[2] or 8))
        else:
            raise InputError(f"--candidates: bad candidate {token!r}; use comma-separated wNaM (weight bits N in "
                             f"{', '.join(map(str, WEIGHT_BITS))}, activation bits M in "
                             f"{', '.join(map(str, ACTIVATION_BITS))}) or float, e.g. w8a8,w4a8,w4a4,float")
        if cand in found:
            raise InputError(f"--candidates lists {token!r} twice")
        found.append(cand)
    if all(c.w_bits is None for c in found):
        raise InputError("--candidates needs at least one quantized candidate (wNaM), e.g. w8a8,float")
    return found


def budget_of(options: CompileOptions) -> str | None:
    """The budget option set (one of ``BUDGETS``), None without one; checks the
    options mixed precision cannot combine with, before any work is done."""
    given = [b for b in BUDGETS if getattr(options, b) is not None]
    if not given:
        return None
    flags = ", ".join("--" + b.replace("_", "-") for b in given)
    if len(given) > 1:
        raise InputError(f"give one mixed-precision budget, not {flags}")
    value = getattr(options, given[0])
    if value <= 0 or (given[0] != "max_drop" and value > 1):
        raise InputError(f"{flags} must be in (0, 1] (a fraction of the fp32 model's)" if given[0] != "max_drop"
                         else f"{flags} must be positive")
    if options.w_bits != 8 or options.a_bits != 8:
        raise InputError(f"{flags} picks each layer's bits from --candidates; leave --w-bits and --a-bits at 8")
    if options.weight_solver not in ("rtn", "bitsplit"):
        raise InputError(f"{flags} cannot be combined with --weight-solver {options.weight_solver}; use rtn or "
                         "bitsplit")
    parse_candidates(options.candidates)
    return given[0]


def dominated(candidates: list[Candidate], cost: np.ndarray) -> np.ndarray:
    """[layers, candidates]: True where another candidate of the layer has at least as many weight and
    activation bits, more of one, and no more cost (a 2-bit Conv stored as int8 codes costs the bytes of
    an 8-bit one; a 4-bit input costs no byte less than an 8-bit one). Such candidates are not measured:
    more bits are assumed never to lose more."""
    out = np.zeros(cost.shape, bool)
    for j, c in enumerate(candidates):
        for k, other in enumerate(candidates):
            if c.w_bits is not None and other.w_bits is not None and other != c \
                    and other.w_bits >= c.w_bits and other.a_bits >= c.a_bits:
                out[:, j] |= cost[:, k] <= cost[:, j]
    return out
