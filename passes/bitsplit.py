"""BitSplit weight solver (``--weight-solver bitsplit``): 2–4-bit weights fitted to each layer's response.

Runs after the round-to-nearest grids (``weights``). For every layer with a 2–4-bit grid it collects
A = XᵀX, XᵀY, ‖Y‖² and the sums of the layer's input patches X and pre-bias fp32 output Y over the
calibration set (``onnxptq/capture.py``). Where X comes from (the mode):

* ``parallel`` (``--weight-solver bitsplit``, the default) — from the fp32 model, as the paper's
  released code does (X and Y both fp32);
* ``sequential`` (``--weight-solver bitsplit-sequential``) — from the QDQ model of the plan, level by
  level, so each layer sees its already-written quantized prefix, and fake-quantized on the layer's
  input grid: the inputs its integer kernel gets; Y stays fp32, so a layer also makes up for the error
  that reaches it; each level is also checked at the model's outputs (``layer_statistics``).

Parallel is the default because the corrections that follow (BN re-estimation re-standardizes every
hidden layer's output on its quantized, corrected prefix) remove the prefix's error a second time
where a sequential fit has already made up for it. At W2/W3/W4 (light pipeline, fp32 agreement;
PP-OCRv4 CER) parallel (before its output check, ``judge_by_outputs``) against sequential: PP-OCRv4 0.649 / 0.887 / 0.909, CER 0.444 / 0.051 / 0.023
against 0.390 / 0.623 / 0.912, CER 0.804 / 0.423 / 0.036; magika 0.948 / 0.978 / 0.983 against
0.941 / 0.966 / 0.984; EfficientNet-Lite0 0.004 / 0.239 / 0.685 (mean KL 4.43 / 1.67 / 0.234)
against 0.008 / 0.235 / 0.712 (4.55 / 1.70 / 0.321); MiniLM-L6 (mean cosine, no BN) 0.689 / 0.892 /
0.954 against 0.730 / 0.915 / 0.967. Parallel is also 3–5× faster (one capture, not one per level).

It then solves for codes and scales (``kernels/bitsplit.py``), starting from the round-to-nearest
grid, so no channel ends worse than it on the fitted objective. The layer as written (after the
bias-safe floor, emission's rounding and with its bias change) is measured again on the statistics
and round-to-nearest is put back unless it is better (``passes/checked.py``, shared with AdaQuant).
In parallel mode every layer written is then judged at the model's outputs (``judge_by_outputs``):
its ΔL — the outputs' distance to fp32 with only that layer quantized, priced as the corrections will
leave it — against round-to-nearest's; it stays only if lower, else the layer is solved again with
stronger weight terms (``RETRY_RIDGES``) and the lowest ΔL below round-to-nearest's stays.
The fitted objective is, per output channel, one of

* ‖Y − X·ŵᵀ − β‖² with the best bias shift β, for a layer with a bias (centered statistics): the bias
  is a free float in the deployed layer, so the codes need not spend themselves on the mean error
  (on EfficientNet-Lite0 W4A8 fitting the uncentered ‖Y − X·ŵᵀ‖² instead leaves top-1 agreement with
  fp32 at 0.13 where the centered fit reaches 0.33); β is added to the layer's bias;
* ‖Y − X·ŵᵀ‖² for a layer without one;
* ‖w − ŵ‖² for a layer with fewer than 2 captured rows per weight of a channel, whose response the
  calibration set cannot pin down (a classifier sees one row per sample; the paper fits its fc layer
  in weight space too);

and a response fit adds λ·tr(A)/K·‖w − ŵ‖² (``RIDGE``): the weight error as white inputs of the
calibration inputs' energy would see it. A small calibration set excites some input directions hardly
at all, and an exact solver trades error there for error where it is measured; other inputs pay for it.

Per-channel grids get one scale per channel; blocked int4 MatMul/Gemm grids one per (block, column),
solved jointly per column. The result is written into the plan as ŵ = q·α and grid scale α (float32),
so emission's clip(rint(ŵ/α)) reproduces the codes q exactly. Codes stay within ±7, so on targets that
sum u8×s8 products in saturating int16 pairs no pair can overflow (2·7·255 < 32767): nothing to do.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from onnxptq.capture import LayerIO, LayerRows, capture, response_stats
from onnxptq.errors import InputError
from onnxptq.kernels.bitsplit import BitSplitResult, solve
from onnxptq.kernels.quant import channel_rows, fake_quantize, from_channel_rows
from onnxptq.kernels.response import ResponseStats
from onnxptq.kernels.saturation import PAIR_LIMIT
from onnxptq.passes.candidates import budget_of
from onnxptq.passes.checked import Checked, snapshot, write_if_better
from onnxptq.passes.emission import emit_model
from onnxptq.passes.layer_moments import integer_level, level_groups
from onnxptq.passes.pricing import LayerPricer
from onnxptq.passes.sensitivity import SAMPLES, float_outputs, output_distance, reference, subset
from onnxptq.passes.weights import WeightGridPass
from onnxptq.plan import LayerPlan
from onnxptq.state import CompileState
from onnxptq.target import resolve_target
from onnxptq.training.protocol import open_rows

SOLVERS = ("rtn", "bitsplit", "bitsplit-sequential")  # bitsplit: parallel mode
BITS = (2, 3, 4)
# Patch rows kept per layer and batch: ~30k over a 64-sample calibration set, about what the paper's
# released code samples (12k–15k rows), and well above K for every layer of the bundled examples.
MAX_ROWS = 4096
# Rows per weight of a channel below which the response does not determine the weights (see _objective).
MIN_ROWS_PER_INPUT = 2
# Strength λ of the weight term in the response objective (``ResponseStats.ridge``): the exact solver
# otherwise spends the codes on input directions the calibration set barely excites, and other inputs
# do. On EfficientNet-Lite0 (64 crops of 3 photos, light corrections after) fp32 top-1 agreement / mean
# KL at W4A8 went 0.319 / 1.90 (λ = 0) → 0.573 / 0.585 (0.1) → 0.627 / 0.346 (0.3) → 0.712 / 0.321 (1),
# round-to-nearest 0.612 / 0.384; at W3A8 0.177 / 2.50 (0.3), 0.235 / 1.70 (1), round-to-nearest
# 0.212 / 2.55. magika's one Conv gave the same model at λ = 0, 0.3 and 1.
RIDGE = 1.0
# Ridge strengths a layer is solved again at, in this order, when its fit at ``RIDGE`` moves the model's
# outputs no less than round to nearest does (``judge_by_outputs``); the one with the lowest ΔL below
# round-to-nearest's stays. The solver's optimum over ternary planes is a discrete one, and which of
# several fits of near-equal response error moves the outputs least is not smooth in λ: magika's one
# 2-bit Conv (GlobalMaxPool after it: only the largest responses reach the outputs) written at
# λ = 0, 0.1, 0.3, 1, 3, 10 has response errors 0.073–0.099 of ‖Y‖², and ΔL 0.0052, 0.0142, 0.0126,
# 0.0208, 0.0085, 0.0079 against round-to-nearest's 0.0142. Only stronger weight terms: the check reads
# calibration samples the fit was solved on, so it cannot see a weaker term's closer fit to them fail
# elsewhere — with 0.3 among the tries PP-OCRv4 W4A8 kept six second tries (five at 0.3, ΔL 0.13–0.99×
# round-to-nearest's) and agreed with fp32 on 0.913 of the time steps, against 0.930 without.
RETRY_RIDGES = (3.0, 10.0)
# Samples × layers the output check runs each layer's two versions on: all calibration samples for a
# model with few layers, at least the sensitivity's 16 otherwise. On magika (one 3-bit Conv before a
# GlobalMaxPool) the 16-sample KL put round-to-nearest back (ΔL 0.00029 against BitSplit's 0.00082),
# while on the eval set BitSplit agrees with fp32 on 0.978 of the files to round-to-nearest's 0.966.
JUDGE_SAMPLE_RUNS = 256


class BitSplitPass:
    """``--weight-solver bitsplit`` (parallel mode: X from the fp32 model, as the paper) or
    ``bitsplit-sequential`` (X from the quantized model of the plan, level by level, on the layer's
    input grid)."""

    name = "bitsplit"

    def run(self, state: CompileState) -> None:
        solver = state.options.weight_solver
        if solver not in SOLVERS:
            raise InputError(f"unknown --weight-solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if solver == "rtn" or budget_of(state.options) is not None:
            return  # with a mixed-precision budget, that pass solves each candidate (passes/mixed.py)
        layers = [layer for layer in state.plan.layers.values() if layer.grid.bits in BITS]
        if not layers:
            state.report.note(self.name, "no layer has a 2–4-bit weight grid (use --w-bits 2, 3 or 4); "
                                         "weights keep round-to-nearest")
            return
        if resolve_target(state.options.target).int16_pairs:
            assert all(2 * layer.grid.qmax <= PAIR_LIMIT for layer in layers), "codes ≤ 64 are pair-safe"
        start = time.perf_counter()
        reverted: set[str] = set()
        mode = solver.partition("-")[2] or "parallel"
        rtn = {layer.node: (snapshot(state, layer), layer.copy())
               for layer in layers} if mode == "parallel" else {}
        solved: dict[str, ResponseStats] = {}  # parallel mode: kept for the output check's second tries
        rows = []
        for layer, stats in layer_statistics(state, layers, mode, reverted):
            rows.append(solve_layer(state, layer, stats))
            if mode == "parallel":
                solved[layer.node] = stats
        capture_s = time.perf_counter() - start - sum(r["seconds"] for r in rows)
        start = time.perf_counter()
        if mode == "parallel":
            reverted.update(judge_by_outputs(
                state, rows, rtn, lambda layer, ridge: solve_layer(state, layer, solved[layer.node], ridge)))
        check_s = time.perf_counter() - start
        for row in rows:
            if row["node"] in reverted:  # put back: the model's outputs moved no less than with rtn
                row.update(kept=False, error=row["rtn_error"], vs_rtn=1.0, reverted=True)
        state.report.passes.append({"name": self.name, "layers": rows})
        ratios = [r["vs_rtn"] for r in rows if r["vs_rtn"] is not None]
        versus = (f"median ×{statistics.median(ratios):.3f}, worst ×{max(ratios):.3f}" if ratios else "n/a")
        seconds = [r["seconds"] for r in rows]
        state.report.note(self.name, f"{len(rows)} layers ({len(state.plan.layers) - len(rows)} other layers keep "
                                     f"round-to-nearest), {sum(r['kept'] for r in rows)} written, "
                                     f"{len(reverted)} put back as they moved the model's outputs no less than "
                                     f"round-to-nearest at any ridge strength tried "
                                     f"({sum(r['ridge'] != RIDGE for r in rows if r['kept'])} written at another "
                                     f"than {RIDGE:g}), the others not better than round-to-nearest as written; "
                                     f"response error vs round-to-nearest: {versus}; capture {capture_s:.1f} s, "
                                     f"output check {check_s:.1f} s, solve {sum(seconds):.1f} s (per layer: "
                                     f"median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s)")


def solve_layer(state: CompileState, layer: LayerPlan, stats: ResponseStats, ridge: float = RIDGE) -> dict:
    """Solve one layer (a response fit with weight term ``ridge``), write ŵ = q·α, α (and the bias
    shift) into its plan through the round-to-nearest check (``written_loss``), return its report row."""
    start = time.perf_counter()
    grid = layer.grid
    axis = layer.weight_channel_axis
    w = channel_rows(layer.weight, axis)
    objective, fit = _objective(layer, stats, w, ridge)
    scale0 = grid.scale.T if grid.block_size else grid.scale
    result = solve(objective, w, grid.bits, scale0, grid.block_size)

    def write() -> None:
        alpha = result.scale.astype(np.float32)
        if fit == "centered response":
            layer.bias = (layer.bias + stats.bias_shift(_weights(result.codes, alpha, grid.block_size))
                          ).astype(np.float32)
        if grid.block_size:
            grid.scale = np.ascontiguousarray(alpha.T)
        else:
            # The int32 bias must stay representable at s_x·α (raises α where it is below
            # |b|/(s_x·2³⁰), codes kept: what the check is for)
            alpha = WeightGridPass._bias_safe(state, layer, alpha[:, 0])[:, None]
            grid.scale = alpha[:, 0]
        layer.weight = from_channel_rows(_weights(result.codes, alpha, grid.block_size), axis,
                                         layer.weight.shape)

    measured = objective if fit == "weights" else stats
    checked = write_if_better(state, layer, write, written_loss(layer, measured, fit != "weights"))
    return {**_report_row(layer, measured, result, fit, checked, time.perf_counter() - start), "ridge": ridge}


def outputs_prefer_fit(fit: float, rtn: float) -> bool:
    """Whether a layer's fit stays, given its ΔL and round-to-nearest's: only if strictly lower. (A 5%
    allowance for the fit, tried on the benchmark, cost PP-OCRv4 W4A8 0.930 → 0.919 in agreement with
    fp32: near ties go either way.)"""
    return fit < rtn


def judge_by_outputs(state: CompileState, rows: list[dict], rtn: dict[str, tuple[Callable[[], None], LayerPlan]],
                     retry: Callable[[LayerPlan, float], dict]) -> set[str]:
    """Put round to nearest back (through its ``snapshot`` restore in ``rtn``, beside a copy of the
    layer as it was) in every written layer that does not move the model's outputs less than round to
    nearest does (``outputs_prefer_fit``), both priced as the corrections will leave them (``passes/pricing.py``:
    ΔL with only that layer quantized, re-standardized where BN re-estimation will), unless
    ``retry(layer, ridge)`` (a new solve from round to nearest, its report row returned) at one of
    ``RETRY_RIDGES`` does: the one of lowest ΔL then stays, its row replacing the layer's. Returns the
    names put back. Rows gain ``output_loss`` and ``output_loss_rtn``.

    The fit lowers a layer's own response error, not the model's: at W4A8 on PP-OCRv4 every written
    layer beat round to nearest on its response, while the model agreed with fp32 on 0.909 of the time
    steps to round to nearest's 0.922."""
    kept = [row for row in rows if row["kept"]]
    if not kept:
        return set()
    data = subset(state.calib, max(SAMPLES, JUDGE_SAMPLE_RUNS // len(kept)))
    pricer = LayerPricer(state, reference(state.model, state.plan, data, state.options.threads), data)
    worse = set()
    for row in state.progress.track(kept, "bitsplit: output check", len(kept)):
        layer = state.plan.layers[row["node"]]
        restore, before = rtn[layer.node]
        if before.bias is None:  # the zero bias the pricer gave, as BN re-estimation will
            before = dataclasses.replace(before, bias=layer.bias, bias_name=layer.bias_name)
        probe = pricer.probe(layer.node)

        def output_loss() -> float:
            return probe.distance({layer.node: pricer.change(probe, layer)})

        def put_back() -> None:
            restore()
            layer.bias = before.bias  # keeping the zero bias the graph now holds

        row["output_loss_rtn"] = probe.distance({layer.node: pricer.change(probe, before)})
        row["output_loss"] = output_loss()
        if outputs_prefer_fit(row["output_loss"], row["output_loss_rtn"]):
            continue
        put_back()
        best: tuple[float, dict, Callable[[], None]] | None = None
        for ridge in RETRY_RIDGES:
            again = retry(layer, ridge)
            if again["kept"] and outputs_prefer_fit(loss := output_loss(), best[0] if best else row["output_loss_rtn"]):
                best = (loss, again, snapshot(state, layer))
            put_back()
        if best is None:
            worse.add(layer.node)
        else:
            loss, again, write = best
            write()
            row.update(again, output_loss=loss)
    return worse


def layer_statistics(state: CompileState, layers: list[LayerPlan], mode: str, reverted: set[str] | None = None
                     ) -> Iterator[tuple[LayerPlan, ResponseStats]]:
    """(layer, its statistics) for every layer: X and Y from the fp32 model (``parallel``), or in
    ``sequential`` mode Y from the fp32 model and X from the QDQ model of the current plan, level by
    level (``level_groups``; the caller writes each layer before the next level is captured), each
    row fake-quantized on the layer's input grid: the inputs its integer kernel will see.

    Sequential mode also checks every level at the model's outputs: the capture run of a level gives
    the output loss of the plan with the level before it written (``OutputError`` on the calibration
    set: KL to the fp32 class scores, else 1 − cosine); where that is not below the error with that level at its previous entries (measured by the
    run before), they are put back, their names added to ``reverted``, and the level is captured again.
    A layer's response error is not the model's: on magika, BitSplit at 2 bits lowered its one Conv's
    response error to 0.45× round-to-nearest's while the model's output SQNR fell from 28.1 to 20.6 dB
    (a GlobalMaxPool follows, which reads the largest responses only)."""
    if mode == "parallel":
        stats = response_stats(state, layers, MAX_ROWS)
        yield from ((layer, stats.pop(layer.node)) for layer in state.progress.track(layers, "bitsplit: layers",
                                                                                     len(layers)))
        return
    reverted = set() if reverted is None else reverted
    planned = {layer.node: layer for layer in layers}
    order = {name: i for i, name in enumerate(state.plan.layers)}
    reference: dict[int, list[np.ndarray]] = {}
    outputs, normalized = float_outputs(state.model)
    with tempfile.TemporaryDirectory(prefix="onnxptq-bitsplit-") as tmp:
        fp32 = capture(state, layers, lambda io: LayerRows(Path(tmp) / str(order[io.node]), io, False, True),
                       MAX_ROWS, "bitsplit: fp32 outputs", observe=(outputs, reference.__setitem__))
        targets = {name: open_rows(acc.y.close()) for name, acc in fp32.items()}
        groups = level_groups(state.model.graph, planned)
        pending = None  # (restore functions, names, output error) of the level written last
        i = 0
        while True:
            error = OutputError(reference, normalized)
            level = [planned[name] for name in groups[i]] if i < len(groups) else []
            paired = capture(state, level, lambda io: QuantizedInputs(io, targets[io.node],
                                                                      input_grid(state, planned[io.node])),
                             MAX_ROWS, f"bitsplit: level {i + 1}/{len(groups)}", emit_model(state.model, state.plan),
                             integer_level(state), observe=(outputs, error.update))
            if pending is not None:
                restores, names, before = pending
                pending = None
                if not error.value < before:
                    for restore in restores:
                        restore()
                    reverted.update(names)
                    continue  # the same level again, its inputs from the prefix as now planned
            if i == len(groups):
                return
            restores, weights = [snapshot(state, layer) for layer in level], [layer.weight for layer in level]
            yield from ((layer, paired[layer.node].stats) for layer in level)
            if any(layer.weight is not w for layer, w in zip(level, weights)):
                pending = (restores, [layer.node for layer in level], error.value)
            i += 1


class OutputError:
    """The distance of the model's float outputs on the calibration set to the fp32 ``reference``
    (batch → outputs): mean KL for class scores, else 1 − cosine (``sensitivity.output_distance``, the
    loss mixed precision measures); ``update`` is a ``capture`` observer."""

    def __init__(self, reference: dict[int, list[np.ndarray]], normalized: list[bool | None]):
        self.reference, self.normalized, self.outputs = reference, normalized, {}

    def update(self, batch: int, outputs: list[np.ndarray]) -> None:
        self.outputs[batch] = outputs

    @property
    def value(self) -> float:
        batches = sorted(self.reference)
        joined = [[np.concatenate([source[b][i] for b in batches]) for i in range(len(self.normalized))]
                  for source in (self.reference, self.outputs)]
        return output_distance(*joined, self.normalized)


def input_grid(state: CompileState, layer: LayerPlan) -> tuple[float, int, int] | None:
    """(scale, zero point, largest code) of the layer's input grid; None for a float input."""
    if not layer.activation_input:
        return None
    scale, zero = state.plan.act_params(layer.input_name)
    return float(scale), int(zero), state.plan.root(layer.input_name).qmax


class QuantizedInputs:
    """Accumulator for ``capture`` from the quantized model: its X rows, fake-quantized on ``grid``,
    paired with the fp32 targets Y [R, M] captured before from the same rows in the same order
    (``capture`` samples rows by seed, batch and layer)."""

    def __init__(self, io: LayerIO, targets: np.ndarray, grid: tuple[float, int, int] | None):
        self.stats = ResponseStats(io.groups, io.k, io.channels)
        self.targets, self.grid, self.next = targets, grid, 0

    def update(self, x: np.ndarray, y: np.ndarray, weight: float = 1.0) -> None:
        rows = x.shape[1]
        target = self.targets[self.next:self.next + rows]
        self.next += rows
        if self.grid is not None:
            scale, zero, qmax = self.grid
            x = fake_quantize(x, np.float32(scale), zero, 0, qmax)
        self.stats.update(x, target, weight)


def written_loss(layer: LayerPlan, stats: ResponseStats, with_bias: bool) -> Callable[[], float]:
    """The loss of the layer as the plan holds it when called: Σ_c ‖y_c − X ŵ_c − β_c‖² on ``stats``
    with ŵ the weights emission writes (codes times grid scale) and β the layer's bias change since
    this call (``with_bias``; the pass runs on the fp32 biases the statistics' targets subtract)."""
    reference = layer.bias if with_bias else None
    axis = layer.weight_channel_axis

    def loss() -> float:
        shift = None if reference is None else layer.bias.astype(np.float64) - reference
        return float(stats.objective(channel_rows(layer.dequantized(), axis), shift).sum())

    return loss


def _objective(layer: LayerPlan, stats: ResponseStats, w: np.ndarray, ridge: float) -> tuple[ResponseStats, str]:
    """What the layer is fitted to. The response needs rows enough to pin all K weights of a channel
    (a classifier fed one row per sample would fit the calibration set exactly; the paper fits its fc
    layer in weight space too), else ‖w − ŵ‖². A layer with a bias gets its best per-channel bias
    shift along (the centered statistics): the bias is free in the deployed layer, and the mean error
    is what bias correction removes anyway. Response fits carry the weight term of strength ``ridge``."""
    if stats.rows < MIN_ROWS_PER_INPUT * stats.gram.shape[1]:
        return ResponseStats.weight_space(w, stats.groups), "weights"
    if layer.bias is not None:
        return stats.centered().ridge(w, ridge), "centered response"
    return stats.ridge(w, ridge), "response"


def _weights(codes: np.ndarray, alpha: np.ndarray, block: int | None) -> np.ndarray:
    """ŵ = q·α (float32, what emission divides back by α) with α [C, 1] per channel or [C, nb] per block."""
    k = codes.shape[1]
    return codes.astype(np.float32) * np.repeat(alpha, block or k, axis=1)[:, :k]


def _report_row(layer: LayerPlan, stats: ResponseStats, result: BitSplitResult, fit: str, checked: Checked,
                seconds: float) -> dict:
    """Relative to ‖Y‖² on ``stats``: the error of the layer as the weights pass left it (round-to-
    nearest, ``rtn_error``), as BitSplit wrote it (``written_error``) and as the plan now holds it
    (``error``: the written one if ``kept``, else round-to-nearest's); ``vs_rtn`` = error / rtn_error;
    ``solver_vs_rtn`` the solver's own objective against round-to-nearest's, before the floors."""
    energy = float(stats.yy.sum()) or 1.0
    rtn = float(result.rtn.sum())
    return {"node": layer.node, "op": layer.op_type, "bits": layer.grid.bits, "k": stats.gram.shape[1],
            "channels": stats.xty.shape[0], "groups": stats.groups, "rows": round(stats.rows), "fit": fit,
            "rtn_error": checked.before / energy, "written_error": checked.written / energy,
            "error": checked.loss / energy, "kept": checked.kept,
            "vs_rtn": checked.loss / checked.before if checked.before > 0 else None,
            "solver_vs_rtn": result.history[-1] / rtn if rtn > 0 else None,
            "iterations": result.iterations, "seconds": round(seconds, 3)}
