"""Mixed precision: each layer's bit-widths chosen by an integer program under one budget.

Runs after the weight grids (on the 8-bit plan every layer starts from) and before the corrections,
which then correct the chosen mix. Candidates (``--candidates``, default ``w8a8,w4a8,w3a8,w2a8,float``)
give weight and activation bits separately, or keep the layer float. Activation bits are those of the
layer's input grid: at 4 bits a range calibrated for 16 codes (``narrow_inputs``). A grid read by
several layers has one width, so the program ties them (``Tables.tied``): they take a 4-bit input
together or not at all, each priced alone with its input at 4 bits (another op reading the grid, such
as a residual Add, reads the 4-bit codes too, unpriced: as with ``--a-bits 4``). Under a size budget a
4-bit input saves no byte and is not measured (``dominated``). For every planned layer l and candidate c:

* ΔL(l, c) — the sensitivity of ``passes/sensitivity.py`` (distance of the outputs to fp32 with only
  layer l at c — its weights and its input grid — on a fixed calibration subset); 0 for float. Where
  the pipeline's BN re-estimation will re-standardize layer l, it is measured re-standardized
  (``passes/pricing.py``): the program should price a layer as the corrections will leave it.
  Measured without, PP-OCRv4's Convs looked ruinous at 4 bits (ΔL ≈ 0.9 for some) although BN
  re-estimation repairs uniform 4-bit to CER 0.037, and the
  program bought 8 bits for them with 2-bit MatMuls; measured corrected, the light pipeline's fp32
  agreement at 0.13× / 0.16× rose from 0.439 / 0.681 to 0.581 / 0.708 (EfficientNet-Lite0) and from
  0.833 to 0.855 at 0.16× (PP-OCRv4);
* bytes(l, c) — the layer's weight and bias payload as emission stores it (``onnxptq/costs.py``);
* BOPs(l, c) = MACs_l · w_bits · a_bits, float counting 32 · 32 (int4 MatMulNBits counts a_bits 8:
  onnxruntime runs it at accuracy level 4, int8 activations inside the kernel).

The program (``kernels/allocation.py``), with x_{l,c} one-hot per layer:

* ``--size-ratio R``:  min Σ ΔL  s.t.  F + Σ bytes(l, c) ≤ R · (fp32 file bytes), where F, the rest of
  the file (activation grids, graph, metadata), is measured on the emitted 8-bit model. The chosen
  plan is then emitted in memory and measured; if the file is over budget (bytes the count leaves out,
  such as the Cast nodes of packed layers), the program is solved again with a limit below what the
  chosen mix was counted at, by the excess (lowering the old limit alone can return the same mix).
* ``--bops-ratio R``:  min Σ ΔL  s.t.  Σ BOPs ≤ R · Σ_l MACs_l · 32 · 32 (the fp32 model's BOPs).
* ``--latency-ratio R``: min Σ ΔL  s.t.  Σ ms(l, c) ≤ R · Σ_l ms(l, fp32), ms the layer's measured
  latency alone on this host in the encoding c is emitted in (``onnxptq/latency_table.py``: measured
  once per model and target into ``--latency-table FILE``, read back from it after). Only the weighted
  layers are counted, not the Q/DQ and other ops between them.
* ``--max-drop D``:    min Σ bytes (ties broken by fewer BOPs)  s.t.  Σ ΔL ≤ D, D in ΔL's units.

The program adds single-layer losses, which need not add up to the model's. So under a size, BOPs or
latency budget its choice is measured end to end beside every uniform choice (one candidate for all
rows) that fits the same budget — each re-planned, corrected by the pipeline's BN re-estimation and
bias correction (each kept only where it brings the outputs nearer fp32, as in the pipeline:
``passes/kept.py``), emitted and run on onnxruntime over the calibration set (not only the probe's
subset: the comparison is of whole models and costs one run each) — and the nearest fp32 is kept
(``_best_measured``): the result is never, by that measure, worse than a uniform model within the
budget. (magika at ``--size-ratio 0.152``, which uniform 4-bit just fits: the program chose a 2-bit
Conv, which agrees with fp32 on 0.939 of the eval files; uniform 4-bit, measured nearer, on 0.9755.)
Measured beside them: the cheapest uniform choice over the budget, demoted to fit (``demoted``: the
program over that candidate and those with fewer bits), where the losses that are added are those of
the few demoted layers; and the dearest uniform choice within the budget, promoted (``promoted``: the
program over that candidate and those with more bits, float included). PP-OCRv4 at 0.16× (float32 block
scales, before ``emission.half_scales``): the program bought 8 bits and float for its early Convs with
2-bit layers elsewhere (measured 0.364, eval agreement 0.855); uniform 4-bit with six layers at 2 bits
measured 0.306 and was written (0.903, CER 0.037, as uniform 4-bit's at 0.165×). A contender solved
right at the limit can emit a few bytes over it (the count leaves out the Casts of packed layers); it is
solved again below (``emitted_within``).

An infeasible budget is an input error naming the smallest achievable value. The chosen bits are
written back by re-running selection with per-layer bits (a float layer leaves the plan with the
Q/DQ pairs only it needed; a 4-bit MatMul/Gemm, stored int4 for MatMulNBits, loses its input pair),
float being offered only to layers that selection can keep float alone (``alone_float``),
with the calibrated ranges and the grids fitted for the sensitivity. Layers that can take a bias
(Conv, Gemm) get a zero one first, so the byte count holds whatever corrections add later.

With ``--weight-solver bitsplit`` every 2–4-bit candidate is its BitSplit fit (``passes/bitsplit.py``,
parallel mode: one capture of the fp32 responses serves every width): measured, priced and, where
chosen, emitted as such (``replan`` carries a fit's weights and bias along with its grid).

Lookup tables (``plan.tables``, embeddings read by Gather) are rows of the program too: at a
candidate of 8, 4, 3 or 2 weight bits the table is stored at that width (``passes/tables.py``), at float
float; the other candidates are not offered. Its ΔL is measured like a layer's (the table replaced by
T̂), its bytes are the codes and per-column scales and zero points, its BOPs and latency 0 (a lookup computes
nothing). MiniLM-L6's int8 word-embedding table alone is 0.13× of its fp32 file, so without a 4-bit
table no budget near that is reachable.

Under a byte budget a large class head arrives split by how probable the calibration set makes each
class (``passes/heads.py``): each part is a row of its own, so the classes the data never makes
probable can take 2 bits while the others keep 4 or 8 (PP-OCRv4's 6625-class head, 30% of its weights).

Only what can be chosen is measured: a candidate with fewer weight bits that costs no less than one
with more (a 2-bit Conv stored as int8 codes, under a size budget) is left out (``dominated``).
``--sweep DIR`` also solves ``SWEEP_POINTS`` budgets of the same kind on the same tables and writes the
Pareto curve there (``onnxptq/pareto.py``).

The report (``mixed``) lists per layer the choice and every candidate's ΔL, bytes and BOPs, and the
additivity check: the predicted Σ ΔL against ΔL measured with all choices at once on the same probe.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxptq.capture import response_stats
from onnxptq.costs import counted_bytes, layer_encoding, layer_storage_bytes
from onnxptq.errors import InputError
from onnxptq.graph import attr
from onnxptq.kernels.allocation import Infeasible, allocate, smallest_total
from onnxptq.latency_table import layer_latencies
from onnxptq.passes.bias_correction import BiasCorrectionPass, give_bias
from onnxptq.passes.bitsplit import BITS, MAX_ROWS, outputs_prefer_fit, solve_layer
from onnxptq.passes.bn_reestimate import BNReestimatePass
from onnxptq.passes.calibration import calibrated_range
from onnxptq.passes.candidates import FLOAT_BITS, Candidate, budget_of, dominated, parse_candidates
from onnxptq.pareto import write_sweep
from onnxptq.passes.emission import output_model
from onnxptq.passes.kept import calibration_reference, plan_distance
from onnxptq.passes.pricing import LayerPricer
from onnxptq.passes.select import SelectPass, weight_grid
from onnxptq.passes.sensitivity import Change, InputGrid, Reference, build_probe, reference, subset
from onnxptq.passes.tables import TABLE_BITS, fit_table
from onnxptq.passes.weights import WeightGridPass
from onnxptq.plan import ActivationPlan, LayerPlan, QuantPlan, TablePlan
from onnxptq.state import CompileState, Report
from onnxptq.target import resolve_target

SIZE_RETRIES = 3
SWEEP_POINTS = 8


def table_widths(candidates: list[Candidate]) -> list[int | None]:
    """Per candidate, the width a lookup table takes at it: the weight bits where a table can be stored
    at them (``TABLE_BITS``; the first such candidate only, the others would repeat it), ``FLOAT_BITS``
    for float, None where it cannot."""
    widths, seen = [], set()
    for c in candidates:
        w = FLOAT_BITS if c.w_bits is None else c.w_bits if c.w_bits in TABLE_BITS else None
        widths.append(None if w in seen else w)
        seen.add(w)
    return widths


def alone_float(state: CompileState, layers: list[str]) -> set[str]:
    """The layers that can be kept float without taking others along. Selection keeps a float layer's
    output float (else onnxruntime would fuse the layer anyway), so in a chain of Conv layers the next
    one, reading that float tensor, turns float too; the program prices each layer alone, so float is
    offered only where selection with that one layer float still plans every other layer."""
    alone = set()
    for name in layers:
        scratch = dataclasses.replace(state, plan=QuantPlan(folded_bn=state.plan.folded_bn, bounds=state.plan.bounds),
                                      report=Report())
        try:
            SelectPass({name: None}).run(scratch)
        except InputError:  # no layer left at all
            pass
        if set(scratch.plan.layers) == set(layers) - {name}:
            alone.add(name)
    return alone


def narrow_inputs(state: CompileState, layers: list[LayerPlan]) -> dict[str, ActivationPlan]:
    """Per layer that can take a 4-bit input candidate, that input grid: 4 bits, range calibrated for
    16 codes. Every layer with a quantized input can, unless the grid is a constant's or also a model
    output (whose values would lose the bits); layers reading one grid share it (``Tables.tied``)."""
    plan = state.plan
    outputs = {v.name for v in state.model.graph.outputs}
    eligible = {}
    for layer in layers:
        if not layer.activation_input or layer.input_name not in plan.activations:
            continue
        root = plan.root(layer.input_name)
        if not root.constant and not any(plan.root(n) is root for n in outputs & plan.activations.keys()):
            eligible[layer.node] = root
    ranges = {root.name: calibrated_range(state, root.name, 4) for root in eligible.values()}
    return {name: dataclasses.replace(root, bits=4, lo=ranges[root.name][0], hi=ranges[root.name][1])
            for name, root in eligible.items()}


def replan(state: CompileState, old: QuantPlan, chosen: dict[str, LayerPlan | TablePlan | None],
           narrow: dict[str, ActivationPlan] | None = None) -> None:
    """Replace the plan by selection at the chosen per-layer bits (None: float), reusing ``old``'s
    calibrated ranges and the chosen candidates' fitted grids; ``old``'s tables take their chosen
    widths (None: float). The layers in ``narrow`` read their input on the grid given there (a 4-bit
    input candidate: bits and range)."""
    state.plan = QuantPlan(folded_bn=old.folded_bn, bounds=old.bounds)
    grids = {name: g for name, g in chosen.items() if name not in old.tables}
    bits = {name: None if g is None else g.grid.bits for name, g in grids.items()}
    SelectPass(bits).run(dataclasses.replace(state, report=Report()))  # same plan object, no repeated notes
    for name, act in state.plan.activations.items():
        # a tensor that was tied (say a Reshape after a layer now kept float) takes its old root's range
        source = old.root(name)
        act.lo, act.hi = source.lo, source.hi
    for name, layer in state.plan.layers.items():  # a weight solver's fit: its weights, bias and grid
        fit = grids[name]
        layer.weight, layer.bias, layer.grid = fit.weight, fit.bias, dataclasses.replace(fit.grid)
    for name, grid in (narrow or {}).items():
        root = state.plan.root(state.plan.layers[name].input_name)
        root.bits, root.lo, root.hi = grid.bits, grid.lo, grid.hi
    tables = {name: chosen.get(name, table) for name, table in old.tables.items()}
    state.plan.tables = {name: table for name, table in tables.items() if table is not None}


@dataclass
class Tables:
    """Everything the program needs, per layer (rows: the planned layers, then the lookup tables) and
    candidate (columns); ``cost`` is the table the budget bounds (bytes, BOPs, or for ``max_drop``
    bytes with BOPs as tie-break), ``fixed`` the file bytes outside layer and table payloads, ``old``
    the 8-bit plan the choices are re-planned from."""

    budget: str
    candidates: list[Candidate]
    layers: list[LayerPlan | TablePlan]
    fitted: dict[str, list]
    loss: np.ndarray
    size: np.ndarray
    bops: np.ndarray
    macs: np.ndarray
    cost: np.ndarray
    fixed: float
    fp32_bytes: int
    old: QuantPlan
    ref: Reference
    fp32_ms: float = 0.0  # Σ of the layers' fp32 latencies (latency budgets)
    changes: dict[str, list[Change | None]] = dataclasses.field(default_factory=dict)  # as ΔL measured them
    contenders: list[dict] = dataclasses.field(default_factory=list)  # measured end to end (``_best_measured``)
    # (row, column) → round to nearest where ``fitted`` holds a weight solver's fit, priced beside it
    alternatives: dict[tuple[str, int], LayerPlan] = dataclasses.field(default_factory=dict)
    # layer → its input's 4-bit grid, calibrated at 4 bits, where its 4-bit input candidates can be chosen
    narrow: dict[str, ActivationPlan] = dataclasses.field(default_factory=dict)
    unavailable: np.ndarray | None = None  # [rows, candidates]: True where the row cannot take the candidate

    def limit(self, value: float) -> float:
        """The budget option's ``value`` as a limit on the program's constrained total."""
        return {"size_ratio": value * self.fp32_bytes - self.fixed,
                "bops_ratio": value * self.macs.sum() * FLOAT_BITS**2, "latency_ratio": value * self.fp32_ms,
                "max_drop": value}[self.budget]

    def program(self) -> tuple[np.ndarray, np.ndarray]:
        """(objective, constrained) tables of ``allocate``."""
        return (self.cost, self.loss) if self.budget == "max_drop" else (self.loss, self.cost)

    def chosen(self, choice: np.ndarray) -> dict[str, LayerPlan | TablePlan | None]:
        """Row name → its fitted plan at ``choice`` (None: float), as ``replan`` takes it."""
        return {l.node: self.fitted[l.node][c] for l, c in zip(self.layers, choice)}

    def tied(self) -> tuple[list[tuple[int, int]], list[int]]:
        """(row pairs, columns) for ``allocate``: the rows whose layers read one input grid take a 4-bit
        input candidate together or not at all (the grid has one width for all its readers)."""
        groups = collections.defaultdict(list)
        for i, layer in enumerate(self.layers):
            if layer.node in self.narrow:
                groups[self.narrow[layer.node].name].append(i)
        pairs = [(rows[0], other) for rows in groups.values() for other in rows[1:]]
        return pairs, [j for j, c in enumerate(self.candidates) if c.a_bits == 4]

    def replan(self, state: CompileState, choice: np.ndarray) -> None:
        """``replan`` at ``choice``: the chosen grids, and the 4-bit input grids of the layers at a 4-bit
        input candidate."""
        narrow = {l.node: self.narrow[l.node] for l, c in zip(self.layers, choice)
                  if self.candidates[c].a_bits == 4 and l.node in self.narrow}
        replan(state, self.old, self.chosen(choice), narrow)

    def label(self, row: int, column: int) -> str:
        """How row ``row`` is stored at candidate ``column``: the candidate, or a table's width."""
        fit = self.fitted[self.layers[row].node][column]
        return f"int{fit.bits} table" if isinstance(fit, TablePlan) else self.candidates[column].label

    def counts(self, choice: np.ndarray) -> dict[str, int]:
        """How many rows ``choice`` stores each way (``label``), in candidate order, tables last."""
        found = collections.Counter(self.label(i, c) for i, c in enumerate(choice))
        order = [c.label for c in self.candidates] + [f"int{bits} table" for bits in TABLE_BITS]
        return {k: found[k] for k in order if found[k]}

    def below(self, limit: float, choice: np.ndarray, excess: float) -> float:
        """The limit to solve again at when ``choice``'s emitted file is ``excess`` bytes over the budget:
        below what the choice was counted at (not ``limit``, which it may undercut by more than the
        excess: then the same choice comes back), by the bytes the count missed."""
        return min(limit, self.cost[np.arange(len(choice)), choice].sum()) - excess - 1

    def all_float(self, choice: np.ndarray) -> bool:
        """Whether ``choice`` keeps every layer float (tables aside): selection cannot re-plan a model
        whose only quantized op would be a lookup."""
        return all(self.candidates[c].w_bits is None for l, c in zip(self.layers, choice)
                   if not isinstance(l, TablePlan))

    def summary(self, choice: np.ndarray) -> dict[str, float]:
        rows = np.arange(len(self.layers))
        latency = {"latency_ratio": float(self.cost[rows, choice].sum() / self.fp32_ms)} if self.fp32_ms else {}
        return {"predicted_loss": float(self.loss[rows, choice].sum()),
                "bops_ratio": float(self.bops[rows, choice].sum() / (self.macs.sum() * FLOAT_BITS**2)), **latency}


def demoted(t: Tables, column: int, limit: float) -> np.ndarray | None:
    """The uniform choice at candidate ``column``, which is over ``limit``, demoted to fit: the program
    solved with every row at that candidate or one with no more weight and no more activation bits
    (never float), None if no such choice fits.

    Single-layer losses need not add up, and the further a mix is from the points where they were
    measured the less they do: PP-OCRv4's early Convs cost ΔL 0.1–0.19 each alone at 4 bits, the 45
    layers all at 4 bits add up to 0.96 but measure 0.35 jointly, so a program over all candidates buys
    8 bits (even float) for those Convs with 2-bit layers elsewhere. Near a uniform model only the few
    demoted layers' losses are added, so this contender is measured beside the program's choice."""
    return _near_uniform(t, column, limit, fewer=True)


def promoted(t: Tables, column: int, limit: float) -> np.ndarray | None:
    """The uniform choice at candidate ``column``, which fits ``limit``, promoted within it: the program
    solved with every row at that candidate or one with no fewer weight and no fewer activation bits
    (float counting as more than any), None if no such choice fits.

    The contender ``demoted`` is for a budget just under a uniform model, this one for a budget just
    over it: every layer keeps at least the uniform model's bits and the bytes left buy more for the
    layers whose ΔL falls most. magika at 0.16× under BitSplit: the program over all candidates put its
    Conv (84% of the weights) at 3 bits to buy 8 bits and float for the two small layers, measured
    0.0021 on the calibration set against uniform 4-bit's 0.0022 (eval agreement 0.9696 against 0.978);
    uniform 4-bit with its byte-embedding MatMul at 8 bits measured 0.0013 (eval 0.983)."""
    return _near_uniform(t, column, limit, fewer=False)


def _near_uniform(t: Tables, column: int, limit: float, fewer: bool) -> np.ndarray | None:
    """The program over the candidates with no more (``fewer``) or no fewer weight and activation bits
    than candidate ``column`` (float: more than any; a lookup table has no input), None if infeasible."""
    top = t.candidates[column]

    def within(bits: int | None, mark: int) -> bool:
        return (bits is not None and bits <= mark) if fewer else (bits is None or bits >= mark)

    weights = np.array([within(c.w_bits, top.w_bits) for c in t.candidates])
    inputs = np.array([within(c.a_bits, top.a_bits) for c in t.candidates])
    table = np.array([isinstance(l, TablePlan) for l in t.layers])[:, None]  # a lookup has no input
    closed = ~(weights & (inputs | table)) | t.unavailable
    try:
        return allocate(np.where(closed, np.nan, t.loss), np.where(closed, np.nan, t.cost), limit, *t.tied())
    except (Infeasible, ValueError):  # ValueError: some row has no candidate left (a float-only row)
        return None


def emitted_within(state: CompileState, t: Tables, solve: Callable[[float], np.ndarray | None], limit: float
                   ) -> np.ndarray | None:
    """``solve(limit)``, re-planned into ``state``; under a size budget, while the emitted file is over
    ``limit`` (plus the rest of the file), solved again below what the choice was counted at by the
    excess (``SIZE_RETRIES`` tries; None if none fits). The count leaves out a few bytes per packed
    layer (the Casts of its codes and float16 scales), which a choice solved right at the limit
    (EfficientNet-Lite0's demoted contender at 0.13×) can exceed it by."""
    bound = limit
    for _ in range(SIZE_RETRIES):
        x = solve(bound)
        if x is None:
            return None
        t.replan(state, x)
        excess = output_model(state).ByteSize() - (limit + t.fixed) if t.budget == "size_ratio" else 0
        if excess <= 0:
            return x
        bound = t.below(bound, x, excess)
    return None


class MixedPrecisionPass:
    name = "mixed-precision"

    def run(self, state: CompileState) -> None:
        budget = budget_of(state.options)
        if budget is None:
            return
        opts = state.options
        t = self._tables(state, budget)
        if opts.sweep:
            write_sweep(opts.sweep, budget, self._sweep(state, t))
        choice, emitted = self._apply(state, t, getattr(opts, budget))
        joint = self._joint(state, t, choice)
        candidates, layers, loss = t.candidates, t.layers, t.loss
        state.report.mixed = {
            "budget": {budget: getattr(opts, budget)}, "candidates": [c.label for c in candidates],
            "samples": len(t.ref.outputs[0]) if t.ref.outputs else 0, **t.summary(choice), "measured_loss": joint,
            "contenders": t.contenders,
            "size_ratio": round(emitted / t.fp32_bytes, 6), "other_bytes": int(t.fixed), "fp32_bytes": t.fp32_bytes,
            "layers": [{"node": l.node, "op": l.op_type, "choice": t.label(i, c),
                        "loss": {cand.label: None if np.isnan(loss[i, j]) else float(loss[i, j])
                                 for j, cand in enumerate(candidates)},
                        "bytes": {cand.label: None if np.isnan(t.size[i, j]) else int(t.size[i, j])
                                  for j, cand in enumerate(candidates)},
                        **({"ms": {cand.label: float(t.cost[i, j]) for j, cand in enumerate(candidates)}}
                           if t.budget == "latency_ratio" else {}),
                        "macs": int(t.macs[i])} for i, (l, c) in enumerate(zip(layers, choice))],
        }
        counts = t.counts(choice)
        state.report.note(self.name, f"{budget.replace('_', ' ')} {getattr(opts, budget)}: "
                          + ", ".join(f"{k} ×{n}" for k, n in counts.items())
                          + f"; ΔL predicted {state.report.mixed['predicted_loss']:.4g}, measured jointly "
                            f"{joint:.4g} on {state.report.mixed['samples']} samples; emitted "
                            f"{emitted / t.fp32_bytes:.4f}× fp32 bytes"
                          + ("; measured corrected: " + ", ".join(f"{c['choice']} {c['measured_loss']:.4g}"
                                                                  for c in t.contenders) if t.contenders else ""))

    def _tables(self, state: CompileState, budget: str) -> Tables:
        """Fit every candidate's grid, price it, check the budget can be met, then measure ΔL."""
        opts = state.options
        candidates = parse_candidates(opts.candidates)
        planned = list(state.plan.layers.values())
        for layer in planned:
            give_bias(state, layer)
        fitted, alternatives = self._fit(state, planned, candidates)
        tables, widths = list(state.plan.tables.values()), table_widths(candidates)
        for table in tables:
            fitted[table.node] = [None if w in (None, FLOAT_BITS) else fit_table(table.node, table.name, table.table, w,
                                                                                   opts.weight_method) for w in widths]
        layers = [*planned, *tables]
        alone = alone_float(state, [l.node for l in planned]) if Candidate(None, None) in candidates else set()
        narrow = narrow_inputs(state, planned) if any(c.a_bits == 4 for c in candidates) else {}
        unavailable = np.array([[(c.w_bits is None and l.node not in alone)
                                 or (c.a_bits == 4 and (l.node not in narrow or not f.activation_input))
                                 for c, f in zip(candidates, fitted[l.node])] for l in planned]
                               + [[w is None for w in widths] for _ in tables]).reshape(len(layers), len(candidates))
        ref = reference(state.model, state.plan, subset(state.calib), opts.threads)
        goal = state.plan.goal
        size = np.array([[layer_storage_bytes(l, goal, "fp32") if f is None else counted_bytes(f, goal)
                          for f in fitted[l.node]] for l in layers], np.float64)
        size[len(planned):][unavailable[len(planned):]] = np.nan  # no such table encoding
        macs = np.array([ref.macs.get(l.node, 0) for l in layers], np.float64)
        bops = macs[:, None] * np.array([c.bops_per_mac for c in candidates], np.float64)[None, :]
        ms, fp32_ms = self._latency(state, planned, fitted, candidates) if budget == "latency_ratio" else (None, 0.0)
        if ms is not None:  # a lookup's cost is not measured: the same in every encoding
            ms = np.vstack([ms, np.zeros((len(tables), len(candidates)))])
        cost = {"size_ratio": size, "bops_ratio": bops, "latency_ratio": ms,
                "max_drop": size + bops / max(bops.max() * len(layers), 1.0)}[budget]  # bytes, ties by BOPs
        fixed = output_model(state).ByteSize() - sum(layer_storage_bytes(l, goal) for l in layers)
        t = Tables(budget, candidates, layers, fitted, np.zeros(cost.shape), size, bops, macs, cost, fixed,
                   state.source.ByteSize(), state.plan, ref, fp32_ms,
                   {l.node: [None] * len(candidates) for l in layers}, alternatives=alternatives, narrow=narrow,
                   unavailable=unavailable)
        masked = np.where(unavailable, np.nan, cost)
        if budget == "size_ratio":  # the rest of the file, measured on the smallest choice too
            cheapest = np.nanargmin(masked, axis=1)
            t.replan(state, cheapest)
            t.fixed = min(fixed, output_model(state).ByteSize() - size[np.arange(len(layers)), cheapest].sum())
            state.plan = t.old
        smallest = Infeasible(smallest_total(masked, *t.tied()))
        if budget != "max_drop" and t.limit(getattr(opts, budget)) < smallest.smallest:  # before measuring
            raise InputError(self._infeasible(t, smallest))
        self._sensitivity(state, t, dominated(candidates, cost) | unavailable)
        return t

    def _apply(self, state: CompileState, t: Tables, value: float) -> tuple[np.ndarray, int]:
        """Solve for budget ``value`` and re-plan at the choice; returns it and the emitted file's bytes.
        A size budget the emitted file misses lowers the limit by the excess and solves again."""
        limit = t.limit(value)
        emitted = 0
        for attempt in range(SIZE_RETRIES):
            try:
                choice = self._solve(t, limit)
            except InputError:
                if attempt == 0:
                    raise
                raise InputError(f"--size-ratio {value}: the emitted file ({emitted / t.fp32_bytes:.4f}× of "
                                 "fp32) is larger than the program counted and no choice fits the corrected "
                                 "limit; raise --size-ratio") from None
            if t.all_float(choice):
                raise InputError(f"--{t.budget.replace('_', '-')} {value} keeps every layer float, "
                                 "so there is nothing to quantize; give a smaller budget or leave float out of "
                                 "--candidates")
            choice = self._best_measured(state, t, choice, limit)
            t.replan(state, choice)
            emitted = output_model(state).ByteSize()
            if t.budget != "size_ratio" or emitted <= value * t.fp32_bytes:
                return choice, emitted
            limit = t.below(limit, choice, emitted - value * t.fp32_bytes)
        raise InputError(f"--size-ratio {value}: the emitted model stays at {emitted / t.fp32_bytes:.4f}× after "
                         f"{SIZE_RETRIES} tries; raise the budget slightly")

    @staticmethod
    def _best_measured(state: CompileState, t: Tables, choice: np.ndarray, limit: float) -> np.ndarray:
        """Of the program's ``choice``, every uniform choice within ``limit`` (one candidate for all
        rows; under a size budget judged by the bytes emitted), the cheapest one over it ``demoted``
        to fit and the dearest one within it ``promoted``, the one whose model, corrected by the
        pipeline's BN re-estimation and bias correction, is nearest fp32 on the calibration set (module
        doc); each is recorded in ``t.contenders``. A uniform choice whose candidate has fewer bits
        than another at no smaller total (sub-8-bit codes stored int8) is not measured."""
        t.contenders = []
        if t.budget == "max_drop":  # the limit bounds the loss: nothing uniform to compare bytes with
            return choice
        rows = np.arange(len(t.layers))
        cheap = [p for p in state.corrections if isinstance(p, (BNReestimatePass, BiasCorrectionPass))]
        choices = []
        calibration_reference(state)  # before the scratch copies below, so that they share it (and the distances)

        def measure(label: str, x: np.ndarray) -> dict:
            """Correct the plan of ``x`` (just re-planned) as the pipeline will, emit it, measure it."""
            scratch = dataclasses.replace(state, report=Report())
            for correction in cheap:
                correction.run(scratch)
            predicted = float(t.loss[rows, x].sum())
            return {"choice": label, "counted": float(t.cost[rows, x].sum()),
                    "predicted_loss": None if np.isnan(predicted) else predicted,
                    "measured_loss": plan_distance(scratch)}

        worse = dominated(t.candidates, t.cost.sum(axis=0, keepdims=True))[0]  # e.g. sub-8-bit codes stored int8
        over, fits = [], []  # (total, column) of the uniform choices over the budget and within it
        for j, cand in enumerate(t.candidates):
            uniform = np.full(len(t.layers), j)
            for i in np.flatnonzero(t.unavailable[:, j]):  # a table: stored at the weight bits (no input)
                same = [k for k, c in enumerate(t.candidates) if c.w_bits == cand.w_bits and not t.unavailable[i, k]]
                if same and isinstance(t.layers[i], TablePlan):
                    uniform[i] = same[0]
            cost = t.cost[rows, uniform]
            if cand.w_bits is None or worse[j] or np.isnan(cost).any() or t.unavailable[rows, uniform].any():
                continue
            if np.array_equal(uniform, choice):  # within the budget, measured as the program's
                fits.append((cost.sum(), j))
                continue
            if t.budget != "size_ratio" and cost.sum() > limit:
                over.append((cost.sum(), j))
                continue
            t.replan(state, uniform)
            # under a size budget by the bytes emitted: the rest of the file differs between mixes
            if t.budget != "size_ratio" or output_model(state).ByteSize() <= limit + t.fixed:
                t.contenders.append(measure(f"uniform {cand.label}", uniform))
                choices.append(uniform)
                fits.append((cost.sum(), j))
            else:
                over.append((cost.sum(), j))
        near = [(min(over)[1], demoted, "demoted to fit")] if over else []
        near += [(max(fits)[1], promoted, "promoted within the budget")] if fits else []
        for column, solve, how in near:
            x = emitted_within(state, t, functools.partial(solve, t, column), limit)
            if x is not None and not any(np.array_equal(x, y) for y in (choice, *choices)):
                t.contenders.append(measure(f"uniform {t.candidates[column].label} {how}", x))
                choices.append(x)
        if choices:  # the program's first: it wins a tie
            t.replan(state, choice)
            t.contenders.insert(0, measure("program", choice))
            choices.insert(0, choice)
        state.plan = t.old
        return min(zip(t.contenders, choices), key=lambda pair: pair[0]["measured_loss"])[1] if choices else choice

    @staticmethod
    def _joint(state: CompileState, t: Tables, choice: np.ndarray) -> float:
        """ΔL measured with every row at its chosen candidate at once, each as its ΔL was measured (the
        additivity check); ``state.plan`` is the plan of ``choice``."""
        changes = {l.node: t.changes[l.node][c] for l, c in zip(t.layers, choice) if t.changes[l.node][c] is not None}
        probe = build_probe(state.model, state.plan, list(changes), t.ref, state.options.threads)
        return probe.distance(changes)

    def _sweep(self, state: CompileState, t: Tables) -> list[dict]:
        """The program solved at ``SWEEP_POINTS`` limits from the smallest achievable constrained total
        to the largest any quantized choice reaches, each choice re-planned, emitted and measured
        jointly (a point where every layer stays float is left out)."""
        objective, constrained = t.program()
        available = ~(np.isnan(objective) | np.isnan(constrained))
        quantized = np.array([c.w_bits is not None for c in t.candidates])[None, :]
        top = np.nanmax(np.where(available & quantized, constrained, np.nan), axis=1).sum()
        points = []
        for limit in state.progress.track(np.linspace(smallest_total(np.where(available, constrained, np.nan),
                                                                     *t.tied()),
                                                      top, SWEEP_POINTS), "mixed precision: sweep", SWEEP_POINTS):
            choice = allocate(objective, constrained, float(limit), *t.tied())
            if t.all_float(choice):
                continue
            t.replan(state, choice)
            points.append({"limit": float(limit), **t.summary(choice), "measured_loss": self._joint(state, t, choice),
                           "size_ratio": output_model(state).ByteSize() / t.fp32_bytes,
                           "choices": t.counts(choice)})
        return points

    @staticmethod
    def _latency(state: CompileState, layers: list[LayerPlan], fitted: dict[str, list], candidates: list[Candidate]
                 ) -> tuple[np.ndarray, float]:
        """Milliseconds per layer and candidate (the encoding each is emitted in; float: fp32; a 4-bit
        input: ``int8-a4``, the int8 kernel its packed codes are cast for at load, with the capped
        input), and the sum of the layers' fp32 milliseconds."""
        goal = state.plan.goal

        def encoding(f: LayerPlan | None, cand: Candidate) -> str:
            if f is None:
                return "fp32"
            return "int8-a4" if cand.a_bits == 4 and f.activation_input else layer_encoding(f, goal)

        encodings = {l.node: [encoding(f, c) for f, c in zip(fitted[l.node], candidates)] for l in layers}
        ms = layer_latencies(state, {n: {*e, "fp32"} for n, e in encodings.items()}, state.options.latency_table)
        table = np.array([[ms[l.node][e] for e in encodings[l.node]] for l in layers], np.float64)
        return table, sum(ms[l.node]["fp32"] for l in layers)

    @staticmethod
    def _sensitivity(state: CompileState, t: Tables, skip: np.ndarray) -> None:
        """Fill ``t.loss`` (0 for float, NaN where ``skip``: not measured, not chosen) and ``t.changes``
        per layer and candidate. A layer the pipeline's BN re-estimation will re-standardize is measured
        re-standardized (``passes/pricing.py``)."""
        pricer = LayerPricer(state, t.ref, subset(state.calib))
        t.loss = np.full(skip.shape, np.nan)
        for i, (name, row) in enumerate(state.progress.track(t.fitted.items(), "mixed precision: sensitivity",
                                                             len(t.fitted))):
            measure = [j for j, fit in enumerate(row) if fit is not None and not skip[i, j]]
            t.loss[i, [j for j, fit in enumerate(row) if fit is None and not skip[i, j]]] = 0.0
            if not measure:
                continue
            probe = pricer.probe(name)
            for j in measure:
                fits = [row[j], *([t.alternatives[name, j]] if (name, j) in t.alternatives else [])]
                grid = InputGrid.of(t.narrow[name]) if t.candidates[j].a_bits == 4 else None
                changes = [pricer.change(probe, fit, grid) for fit in fits]
                losses = [probe.distance({name: change}) for change in changes]
                best = 0 if len(fits) == 1 or outputs_prefer_fit(*losses) else 1
                row[j], t.changes[name][j], t.loss[i, j] = fits[best], changes[best], losses[best]

    @staticmethod
    def _fit(state: CompileState, layers: list[LayerPlan], candidates: list[Candidate]
             ) -> tuple[dict[str, list], dict[tuple[str, int], LayerPlan]]:
        """Per layer, per candidate: a copy of the layer on the candidate's fitted grid (None: float);
        and with ``--weight-solver bitsplit``, where its fit was written, the round-to-nearest copy
        by (layer, candidate index), for the sensitivity to choose between (``Tables.alternatives``)."""
        target = resolve_target(state.options.target)
        nodes = {n.name: n for n in state.model.graph}
        fitted = {}
        for layer in layers:
            node = nodes[layer.node]
            row = []
            for cand in candidates:
                if cand.w_bits is None:
                    row.append(None)
                    continue
                grid = weight_grid(node, layer.grid.axis, cand.w_bits, target.goal, target.weight_qmax8,
                                   state.options.block_size)
                copy = dataclasses.replace(layer, grid=grid, activation_input=grid.block_size is None)
                WeightGridPass.fit(state, copy, state.options.weight_method, target.int16_pairs,
                                   attr(node, "group", 1))
                row.append(copy)
            fitted[layer.node] = row
        alternatives = {}
        if state.options.weight_solver == "bitsplit":
            solved = [(name, j, f) for name, row in fitted.items() for j, f in enumerate(row)
                      if f is not None and f.grid.bits in BITS]
            stats = response_stats(state, [l for l in layers if l.node in {name for name, _, _ in solved}], MAX_ROWS)
            for name, j, f in solved:
                rtn = f.copy()
                if solve_layer(state, f, stats[name])["kept"]:
                    alternatives[name, j] = rtn
            state.report.note(MixedPrecisionPass.name, f"bitsplit: {len(alternatives)} of {len(solved)} 2–4-bit "
                                                       "candidates written, the others keep round-to-nearest; "
                                                       "each written one is priced beside round-to-nearest, which "
                                                       "replaces it unless the fit's ΔL is lower")
        return fitted, alternatives

    @staticmethod
    def _solve(t: Tables, limit: float) -> np.ndarray:
        try:
            return allocate(*t.program(), limit, *t.tied())
        except Infeasible as exc:
            raise InputError(MixedPrecisionPass._infeasible(t, exc)) from None

    @staticmethod
    def _infeasible(t: Tables, exc: Infeasible) -> str:
        """The one-line message for a budget below the smallest achievable value ``exc.smallest``."""
        labels = ",".join(c.label for c in t.candidates)
        if t.budget == "size_ratio":
            return (f"--size-ratio is below the smallest file these candidates ({labels}) reach: "
                    f"{(t.fixed + exc.smallest) / t.fp32_bytes:.4f}× of the fp32 bytes; raise --size-ratio to at "
                    "least that" + ("" if t.old.goal != "speed" else
                                    " (or --target ort-cpu-size, which stores weights below 8 bits packed)"))
        if t.budget == "latency_ratio":
            return (f"--latency-ratio is below the smallest these candidates ({labels}) reach: "
                    f"{exc.smallest / t.fp32_ms:.4f} of the layers' fp32 latency on this host; raise it to at least "
                    "that")
        if t.budget == "bops_ratio":
            return (f"--bops-ratio is below the smallest these candidates ({labels}) reach: "
                    f"{exc.smallest / (t.macs.sum() * FLOAT_BITS**2):.5f} of the fp32 BOPs; raise it to at least "
                    "that or add lower-bit candidates")
        hint = ("float is offered only to layers that can be kept float alone" if "float" in labels
                else "or add float to --candidates")
        return (f"--max-drop is below the smallest predicted loss these candidates ({labels}) reach: "
                f"{exc.smallest:.6g}; raise it ({hint})")
