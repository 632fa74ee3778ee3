"""The quantization plan: the one contract between passes.

Passes read and refine the plan; only the emission pass turns it into Q/DQ nodes. A plan holds

* ``layers``      — every node with a constant weight that will run quantized (Conv, ConvTranspose,
                    Gemm, MatMul): its weight grid and the float weight/bias values that solvers may
                    change (emission rounds them on the grid, so a solver that writes w = q·s fixes the
                    codes exactly);
* ``activations`` — every float tensor that gets a Q/DQ pair: its grid, calibrated range, and the
                    tensor it shares its grid with (ops such as MaxPool or Reshape must keep the grid of
                    their input so onnxruntime can run them on integer codes);
* ``ops``         — every node planned to run on an integer kernel, for the fusion-coverage check;
* ``tables``      — constant lookup tables read by Gather (embeddings), stored as int8 or int4 codes.
* ``goal``        — how emission encodes tensors below 8 bits (``speed``, ``size`` or ``generic``, the
                    target's goal, see ``onnxptq/target.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from onnxptq.kernels.quant import (affine_params, block_scales, broadcast_channel, dequantize, fake_quantize, quantize,
                                   symmetric_qmax)


@dataclass
class FoldedBN:
    """A BatchNormalization folded into the preceding layer: y = γ·(x − μ)/√(σ² + ε) + β."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float


@dataclass
class WeightGrid:
    """Symmetric signed grid of a weight: per channel along ``axis`` (or per block of ``block_size``
    along the reduction axis), codes in [−qmax, qmax] (or [−qmax−1, qmax] for blocked int4 storage).
    ``storage`` is the initializer type the codes are written in: int8, int4 packed two per byte,
    int3 eight per three bytes (``onnxptq/int3.py``) or int2 packed four per byte."""

    bits: int
    qmax: int
    axis: int
    scale: np.ndarray | None = None
    block_size: int | None = None
    storage: str = "int8"
    qmin: int | None = None

    @property
    def low(self) -> int:
        return -self.qmax if self.qmin is None else self.qmin


@dataclass
class LayerPlan:
    """A node with a constant weight that runs quantized."""

    node: str
    op_type: str
    weight_name: str
    weight: np.ndarray
    grid: WeightGrid
    input_name: str
    bias_name: str | None = None
    bias: np.ndarray | None = None
    bn: FoldedBN | None = None
    activation_input: bool = True

    @property
    def weight_channel_axis(self) -> int:
        """Axis of the output channels in the weight: the grid axis, except for blocked grids, whose
        axis is the reduction axis K of a 2-D weight."""
        return 1 - self.grid.axis if self.grid.block_size else self.grid.axis

    @property
    def channels(self) -> int:
        """Number of output channels."""
        return self.weight.shape[self.weight_channel_axis]

    def copy(self) -> LayerPlan:
        """A copy whose grid can be rewritten without touching this plan's (the passes replace weight,
        bias and scale arrays, never write into them, so those are shared)."""
        return dataclasses.replace(self, grid=dataclasses.replace(self.grid))

    def dequantized(self) -> np.ndarray:
        """ŵ = q·s, the float weight emission's codes stand for, in the weight's own layout."""
        grid = self.grid
        if grid.block_size is None:
            scale = broadcast_channel(grid.scale, grid.axis, self.weight.ndim)
            return fake_quantize(self.weight, scale, 0, grid.low, grid.qmax)
        w_kn = self.weight if grid.axis == 0 else self.weight.T
        w_hat = fake_quantize(w_kn, block_scales(grid.scale, grid.block_size, w_kn.shape[0]), 0, grid.low, grid.qmax)
        return w_hat if grid.axis == 0 else w_hat.T


@dataclass
class ActivationPlan:
    """A float tensor that gets a Q/DQ pair (uint8 asymmetric, per tensor unless stated)."""

    name: str
    bits: int = 8
    tied_to: str | None = None
    bound: tuple[float, float] | None = None
    lo: float | None = None
    hi: float | None = None
    constant: bool = False

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def params(self) -> tuple[np.float32, int]:
        """Scale and zero point of the calibrated range [lo, hi] ∩ bound."""
        if self.lo is None or self.hi is None:
            raise RuntimeError(f"activation {self.name!r} has no calibrated range")
        lo, hi = self.lo, self.hi
        if self.bound is not None:
            lo, hi = max(lo, self.bound[0]), min(hi, self.bound[1])
        return affine_params(lo, hi, 0, self.qmax)


@dataclass
class TablePlan:
    """A constant float table T [V, D] read by a Gather along axis 0 (an embedding): stored as signed
    ``bits``-bit codes (8, or 4, 3 or 2 packed) with one asymmetric grid per column d (scale s_d, int8 zero
    point z_d; ``kernels.quant.affine_rows``), gathered as codes and dequantized after the lookup,
    T̂[v, d] = (q[v, d] − z_d)·s_d, q in [−2^(bits−1), 2^(bits−1) − 1]. No kernel computes on it, so it
    only shrinks the file and memory, and its grid can use every code."""

    node: str
    name: str
    table: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int = 8

    op_type = "Gather"  # the node that reads it

    @property
    def qmin(self) -> int:
        return -symmetric_qmax(self.bits) - 1

    @property
    def qmax(self) -> int:
        return symmetric_qmax(self.bits)

    def codes(self) -> np.ndarray:
        """The int8 codes q = clip(rint(T / s) + z, qmin, qmax)."""
        return quantize(self.table, self.scale[None, :], self.zero_point[None, :], self.qmin, self.qmax
                        ).astype(np.int8)

    def dequantized(self) -> np.ndarray:
        """T̂ = (q − z)·s, the values the emitted lookup returns."""
        return dequantize(self.codes(), self.scale[None, :].astype(np.float32), self.zero_point[None, :])


@dataclass
class QuantPlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    activations: dict[str, ActivationPlan] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)
    folded_bn: dict[str, FoldedBN] = field(default_factory=dict)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    tables: dict[str, TablePlan] = field(default_factory=dict)
    goal: str = "speed"

    def root(self, name: str) -> ActivationPlan:
        """The activation that owns the grid of ``name`` (following ``tied_to`` links)."""
        act = self.activations[name]
        while act.tied_to is not None:
            act = self.activations[act.tied_to]
        return act

    def act_params(self, name: str) -> tuple[np.float32, int]:
        return self.root(name).params()
