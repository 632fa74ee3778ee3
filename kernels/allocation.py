"""Bit allocation as an integer program: one candidate per layer, the least total of one table under a
limit on the total of another (cvxpy, solved exactly by HiGHS's branch and bound).

Layer l picks candidate c through binaries x_{l,c} ∈ {0, 1} with Σ_c x_{l,c} = 1, and

    minimize Σ_{l,c} x_{l,c}·f_{l,c}   subject to   Σ_{l,c} x_{l,c}·g_{l,c} ≤ G.

With f = ΔL (sensitivity) and g a cost (bytes, BOPs) this is "least loss within a budget"; with
f = cost and g = ΔL it is "least cost within a loss budget" (CalibTIP's own form). Both are
multiple-choice knapsacks: NP-hard in general, but a few hundred binaries solve in well under a
second, and with a zero relative gap the answer is optimal (the tests check it against brute force).
A NaN entry marks a candidate that layer cannot take (x fixed to 0).

The program is feasible iff G ≥ Σ_l min_c g_{l,c}; below that ``Infeasible`` carries that smallest
achievable total, so the caller can name it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import cvxpy as cp
import numpy as np


class Infeasible(ValueError):
    """No choice meets the limit; ``smallest`` is the least achievable constrained total."""

    def __init__(self, smallest: float):
        super().__init__(f"the smallest achievable total is {smallest:.6g}")
        self.smallest = smallest


@contextlib.contextmanager
def _silent_stdout() -> Iterator[None]:
    """File descriptor 1 pointed at /dev/null: HiGHS prints its banner from C, once per process, before
    any option can turn its output off, and stdout is where the CLI writes its summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _choices(available: np.ndarray, tied: Sequence[tuple[int, int]], columns: Sequence[int]
             ) -> tuple[cp.Variable, list]:
    """The binaries x [layers, candidates] and their constraints: one available candidate per row,
    and the ``tied`` rows in ``columns`` together or not at all."""
    x = cp.Variable(available.shape, boolean=True)
    constraints = [cp.sum(x, axis=1) == 1]
    if not available.all():
        constraints.append(cp.multiply((~available).astype(np.float64), x) == 0)
    pick = np.isin(np.arange(available.shape[1]), columns).astype(np.float64)
    constraints += [x[i] @ pick == x[j] @ pick for i, j in tied]
    return x, constraints


def _minimize(table: np.ndarray, x: cp.Variable, constraints: list, available: np.ndarray) -> np.ndarray | None:
    """Per row the chosen column of an optimal solution of min Σ table·x (None if infeasible)."""
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(table, x))), constraints)
    with _silent_stdout():
        problem.solve(solver=cp.HIGHS, mip_rel_gap=0.0, mip_abs_gap=0.0, output_flag=False, threads=1)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        return None
    return np.argmax(np.where(available, x.value, -1.0), axis=1)


def smallest_total(table: np.ndarray, tied: Sequence[tuple[int, int]] = (), columns: Sequence[int] = ()) -> float:
    """Σ_l min_c table_{l,c} over the available (non-NaN) candidates; with ``tied`` rows (``allocate``)
    the least total a choice that respects the ties reaches (a program of its own)."""
    table = np.asarray(table, np.float64)
    if not tied:
        return float(np.nanmin(table, axis=1).sum())
    available = ~np.isnan(table)
    scale = max(float(np.abs(table[available]).max()), 1e-30)
    x, constraints = _choices(available, tied, columns)
    choice = _minimize(np.where(available, table / scale, 0.0), x, constraints, available)
    return float(table[np.arange(len(table)), choice].sum())


def allocate(objective: np.ndarray, constrained: np.ndarray, limit: float,
             tied: Sequence[tuple[int, int]] = (), columns: Sequence[int] = ()) -> np.ndarray:
    """Per layer, the index of its candidate in an optimal solution of the program above
    (``objective`` = f, ``constrained`` = g, ``limit`` = G; both tables [layers, candidates]).

    Each pair (i, j) in ``tied`` adds Σ_{c∈columns} x_{i,c} = Σ_{c∈columns} x_{j,c}: rows i and j take
    a candidate among ``columns`` together or not at all (layers reading one tensor, whose grid has one
    width)."""
    f, g = np.asarray(objective, np.float64), np.asarray(constrained, np.float64)
    available = ~(np.isnan(f) | np.isnan(g))
    if f.shape != g.shape or not available.any(axis=1).all():
        raise ValueError("both tables must have one row per layer, each with an available candidate")
    smallest = smallest_total(np.where(available, g, np.nan), tied, columns)
    if limit < smallest:
        raise Infeasible(smallest)
    # Both sides normalized to O(1): HiGHS's tolerances are absolute, and bytes run to millions.
    f_scale = max(float(np.abs(f[available]).max()), 1e-30)
    g_scale = max(float(np.abs(g[available]).max()), 1e-30)
    f0, g0 = np.where(available, f / f_scale, 0.0), np.where(available, g / g_scale, 0.0)
    x, constraints = _choices(available, tied, columns)
    margin = 0.0
    for _ in range(5):  # re-solve when HiGHS's feasibility tolerance let the limit slip
        choice = _minimize(f0, x, constraints + [cp.sum(cp.multiply(g0, x)) <= limit / g_scale - margin], available)
        if choice is None:
            raise Infeasible(smallest)
        total = float(g[np.arange(len(g)), choice].sum())
        if total <= limit:
            return choice
        margin += (total - limit) / g_scale
    raise Infeasible(smallest)
