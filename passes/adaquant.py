"""AdaQuant pass: fit every layer's weights, bias, weight steps and input step to its fp32 response.

For each planned layer, rows of its input patches X and pre-bias fp32 outputs Y are captured
(``onnxptq/capture.py``, at most ``rows`` per layer and calibration batch) into files in a temporary
folder and read back memory-mapped, so RAM stays bounded by a minibatch whatever the set size; the
folder is removed afterwards. Each layer is then fitted by ``kernels/adaquant.py`` (Adam on
‖a(Ŷ) − a(Y)‖², loss after the absorbed Relu/Clip on both sides), starting from the weights pass's
round-to-nearest grid and kept only where it lowers that loss on the cached rows.

Modes (``mode``):
* ``parallel``   — X from the fp32 model: layers are independent (one capture for all);
* ``sequential`` — X from the QDQ model of the current plan, level by level
  (``layer_moments.level_groups``), so each layer sees its already-fitted quantized prefix (read
  before the layer's own input quantizer, ``emission.quantized_from``); the
  targets Y stay fp32. Both captures sample the same rows (``capture`` seeds per batch and layer).
  The default: on EfficientNet-Lite0 W4A8 (followed by the light corrections) fp32 top-1 agreement
  0.677 against 0.608 in parallel mode and 0.604 for round-to-nearest; on magika 0.978 against
  0.981 and 0.9755 (``python -m benchmarks.run``), at about twice the parallel mode's compile time.
  More steps help here (EfficientNet-Lite0: 0.700, mean KL 0.217 at 300 against 0.677, 0.289 at the
  default 100, which keeps the compile near the benchmark host's time budget); in parallel mode they
  do not (0.608, 0.608, 0.565 at 30, 100, 300): the fits never see the upstream quantization error.

What moves, and how it lands in the plan:
* weights W + V and steps s_w: written as w = q·s_w with grid scale s_w (emission's clip(rint(w/s_w))
  gives q back exactly); then the bias-safe floor of the weights pass, and on targets with int16
  pairs, pair-safe scales for 8-bit grids (codes within ±7 are pair-safe by construction). A layer
  with fewer than ``MIN_ROWS_PER_INPUT`` rows per weight of a channel (a classifier sees one row per
  sample) keeps its float weights (V = 0) and fits only steps and bias: its K weights per channel are
  not determined by the rows.
The report lists per layer the rows, what was fitted, the loss of round-to-nearest and of the fit on
all cached rows, the iterations and the seconds.
* bias: Conv and Gemm get one if they have none (``bias_correction.give_bias``); MatMul keeps none.
* input step s_x: only where this layer is the sole integer consumer of the input's grid (no other
  planned op reads the tensor or one tied to it, and it is not a graph output). A grid shared with
  other consumers (a residual Add, both branches of a fork) cannot be moved for one of them without
  changing the others' inputs, which their own fits (in parallel mode) assumed fixed. The zero point
  stays; s_x is capped so the grid stays inside a Relu/Clip bound (the plan intersects with it).
Blocked int4 grids (MatMulNBits) have one step per (block, column) and a float input.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from onnxptq.capture import LayerIO, LayerRows, capture, layer_io
from onnxptq.errors import InputError
from onnxptq.graph import attr, consumers
from onnxptq.kernels.adaquant import LEARNING_RATES, Fit, LayerProblem, Settings, fit, full_loss, held_rows
from onnxptq.kernels.quant import channel_rows, from_channel_rows, quantize
from onnxptq.kernels.saturation import PAIR_LIMIT
from onnxptq.passes.bias_correction import give_bias
from onnxptq.passes.checked import write_if_better
from onnxptq.passes.emission import emit_model, quantized_from
from onnxptq.passes.layer_moments import integer_level, level_groups
from onnxptq.passes.select import BOUNDED
from onnxptq.passes.weights import WeightGridPass
from onnxptq.plan import LayerPlan
from onnxptq.state import CompileState
from onnxptq.target import resolve_target
from onnxptq.training import engine as ort_engine
from onnxptq.training.layer_graph import LayerOp
from onnxptq.training.protocol import RowSpec, open_rows, row_reader

MODES = ("parallel", "sequential")
ENGINES = ("numpy", "ort-training")
MIN_ROWS_PER_INPUT = 2  # as BitSplit: below this many rows per weight the response does not pin the weights


def fit_files(problem: LayerProblem, x_spec: RowSpec, y_spec: RowSpec, settings: Settings,
              seed: int) -> tuple[Fit, float]:
    """Fit one layer on its row files; (fit, seconds). Module-level so a worker process can run it."""
    start = time.perf_counter()
    # One BLAS thread: the products are small (a minibatch of rows), and OpenBLAS's threads spin
    # against each other on a loaded host (a 256×80·80×480 product took 12–30 ms with 2 threads
    # on the shared 2-core host, 0.6 ms with one). Parallel mode runs layers in processes instead.
    with threadpool_limits(limits=1, user_api="blas"):
        result = fit(problem, row_reader(x_spec, y_spec), y_spec[1][0], settings, seed)
    return result, time.perf_counter() - start


@dataclass
class AdaQuantPass:
    """``mode``: parallel or sequential; ``iterations`` and ``batch`` (rows per Adam step) per layer;
    ``rows``: rows kept per layer and calibration batch; ``workers``: processes fitting independent
    layers at once; ``lr_*``: Adam learning rates of the weights
    (units of their step), bias (units of the channel's output std), weight and input steps (relative);
    ``holdout``: the fraction of each layer's rows (from the last calibration batches) never trained on,
    on which a fit is judged (``Settings``); ``weight_term``: λ of the weight term (``layer_problem``),
    which keeps the quantized weights near the float ones where the calibration inputs barely pin them.
    Off by default: at λ = 1 (advanced pipeline, a host with VNNI, ``benchmarks.compile_one``) it
    mended PP-OCR W4A8 (CER 0.062 → 0.030, round to nearest 0.030) but cost EfficientNet-Lite0 W4A8
    (fp32 top-1 agreement 0.739 → 0.585) and W4A4 (0.519 → 0.427); λ = 0.1 sits between (PP-OCR CER
    0.038, EfficientNet W4A8 0.642);
    ``engine``: ``numpy`` (hand-derived gradients, ``kernels/adaquant.py``) or ``ort-training``
    (the same objective and parameters trained by onnxruntime-training in its own environment,
    ``onnxptq/training``)."""

    mode: str = "sequential"
    iterations: int = Settings.iterations
    batch: int = Settings.batch
    rows: int = 1024
    workers: int = 1
    lr_w: float = LEARNING_RATES["v"]
    lr_b: float = LEARNING_RATES["bias"]
    lr_sw: float = LEARNING_RATES["w_scale"]
    lr_sx: float = LEARNING_RATES["x_scale"]
    holdout: float = Settings.holdout
    weight_term: float = 0.0
    engine: str = "numpy"
    name: ClassVar[str] = "adaquant"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"adaquant: mode must be parallel or sequential; got {self.mode!r}")
        if self.iterations < 0 or min(self.batch, self.rows, self.workers) < 1:
            raise InputError("adaquant: iterations must be ≥ 0; batch, rows and workers ≥ 1")
        if not 0 <= self.holdout < 1:
            raise InputError(f"adaquant: holdout is a fraction of the rows in [0, 1); got {self.holdout}")
        if self.engine not in ENGINES:
            raise InputError(f"adaquant: engine must be numpy or ort-training; got {self.engine!r}")
        if self.engine == "ort-training":
            ort_engine.training_python()  # a missing environment is refused before any work

    def settings(self) -> Settings:
        return Settings(iterations=self.iterations, batch=self.batch, holdout=self.holdout,
                        lr={"v": self.lr_w, "bias": self.lr_b, "w_scale": self.lr_sw, "x_scale": self.lr_sx})

    def run(self, state: CompileState) -> None:
        layers = list(state.plan.layers.values())
        for layer in layers:
            give_bias(state, layer)
        nodes = {n.name: n for n in state.model.graph}
        ios = {layer.node: layer_io(nodes[layer.node], layer) for layer in layers}
        start = time.perf_counter()
        report: list[dict] = []
        order = {name: i for i, name in enumerate(state.plan.layers)}
        settings, seed = self.settings(), state.options.seed
        with tempfile.TemporaryDirectory(prefix="onnxptq-adaquant-") as tmp:
            folder = Path(tmp)
            parallel = self.mode == "parallel"
            fp32 = capture(state, layers, lambda io: LayerRows(folder / str(order[io.node]), io, parallel, True),
                           self.rows, "adaquant: fp32 rows")
            targets = {name: acc.y.close() for name, acc in fp32.items()}

            def fit_all(group: list[LayerPlan], inputs: dict[str, LayerRows]) -> None:
                x_specs = [inputs[layer.node].x.close() for layer in group]
                problems = [layer_problem(state, layer, ios[layer.node], open_rows(targets[layer.node]),
                                          self.weight_term * input_energy(x_spec) if self.weight_term else 0.0)
                            for layer, x_spec in zip(group, x_specs)]
                jobs = [(p, x_spec, targets[layer.node], settings, seed)
                        for layer, p, x_spec in zip(group, problems, x_specs)]
                ops = [LayerOp(layer.op_type, ios[layer.node].kernel) for layer in group]
                for job, layer, (result, seconds) in zip(jobs, group, self._map(state, jobs, ops)):
                    result = write_checked(state, layer, ios[layer.node], job[0], result, *job[1:4])
                    report.append(_report_row(layer, ios[layer.node], job[0], result, seconds))

            if parallel:
                fit_all(layers, fp32)
            else:
                groups = level_groups(state.model.graph, state.plan.layers)
                for group in state.progress.track(groups, "adaquant: levels", len(groups)):
                    level = [state.plan.layers[name] for name in group]
                    quantized = capture(state, level, lambda io: LayerRows(folder / f"{order[io.node]}q", io, True,
                                                                           False),
                                        self.rows, "adaquant: quantized rows", emit_model(state.model, state.plan),
                                        integer_level(state), quantized_from(state.model, state.plan))
                    fit_all(level, quantized)
        state.report.passes.append({"name": self.name, "layers": report})
        ratios = [r["vs_rtn"] for r in report if r["vs_rtn"] is not None] or [1.0]
        state.report.note(self.name, f"{len(report)} layers, mode {self.mode}, {self.iterations} iterations × "
                                     f"≤{self.batch} rows; layer loss vs round-to-nearest: median "
                                     f"×{statistics.median(ratios):.3f}, worst ×{max(ratios):.3f}; "
                                     f"{sum(r['input_step'] for r in report)} input steps moved; "
                                     f"{time.perf_counter() - start:.1f} s")

    def _map(self, state: CompileState, jobs: list[tuple], ops: list[LayerOp]) -> Iterator[tuple[Fit, float]]:
        """``fit_files`` (or the onnxruntime-training engine, given each layer's operator ``ops``) over
        independent layers (all of them in parallel mode, one level's in sequential mode), in
        ``workers`` processes, in order and seeded alike, so the result does not depend on the number
        of workers."""
        if self.engine == "ort-training":
            ort_jobs = [(p, op, *rest) for (p, *rest), op in zip(jobs, ops)]
            fits = ort_engine.fit_layers(ort_jobs, self.workers)
            yield from state.progress.track(fits, "adaquant: layers (onnxruntime-training)", len(jobs))
            return
        if self.workers <= 1:
            yield from (fit_files(*job) for job in state.progress.track(jobs, "adaquant: layers", len(jobs)))
            return
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fit_files, *job) for job in jobs]
            yield from (f.result() for f in state.progress.track(futures, "adaquant: layers", len(futures)))


def _report_row(layer: LayerPlan, io: LayerIO, problem: LayerProblem, result: Fit, seconds: float) -> dict:
    """Per layer: rows, what was fitted, the loss of round-to-nearest and of the fit, iterations, time."""
    return {"node": layer.node, "op": layer.op_type, "rows": result.rows, "k": io.k, "channels": io.channels,
            "weights": problem.learn_weights, "input_step": problem.learning()["x_scale"],
            "rtn_loss": result.loss_rtn, "loss": result.loss,
            "vs_rtn": result.loss / result.loss_rtn if result.loss_rtn > 0 else None,
            "iterations": result.iterations, "seconds": round(seconds, 3)}


def output_bound(state: CompileState, layer: LayerPlan) -> tuple[float, float] | None:
    """The (lo, hi) of the Relu/Clip that is the layer output's only consumer, if any."""
    node = next(n for n in state.model.graph if n.name == layer.node)
    users = consumers(node.outputs[0])
    if len(users) == 1 and users[0].op_type in BOUNDED and not node.outputs[0].is_graph_output():
        return state.plan.bounds.get(users[0].outputs[0].name)
    return None


def movable_input_step(state: CompileState, layer: LayerPlan) -> bool:
    """Whether ``layer`` is the only integer consumer of its input's grid (see the module doc)."""
    if not layer.activation_input:
        return False
    plan = state.plan
    root = plan.root(layer.input_name)
    if root.constant:
        return False
    sharing = {name for name in plan.activations if plan.root(name) is root}
    values = {v.name: v for n in state.model.graph for v in n.outputs} | {v.name: v for v in state.model.graph.inputs}
    readers = {u.name for name in sharing for u in consumers(values[name]) if u.name in plan.ops}
    return readers == {layer.node} and not any(values[name].is_graph_output() for name in sharing)


def _input_step_cap(state: CompileState, layer: LayerPlan, zero: int) -> float:
    """The largest s_x whose grid [−z·s_x, (Q − z)·s_x] stays inside the root's Relu/Clip bound."""
    root = state.plan.root(layer.input_name)
    if root.bound is None:
        return np.inf
    lo, hi = root.bound
    caps = [hi / (root.qmax - zero)] if np.isfinite(hi) and root.qmax > zero else []
    caps += [-lo / zero] if np.isfinite(lo) and zero > 0 else []
    return min(caps, default=np.inf)


def input_energy(x_spec: RowSpec, rows: int = 4096) -> float:
    """Mean square of the cached input patch entries, E‖x‖²/K, over at most ``rows`` rows spread evenly
    over the file (rows are cached batch after batch: the first ones would be the first samples')."""
    x = open_rows(x_spec)
    return float(np.mean(np.square(x[::max(1, -(-len(x) // rows))], dtype=np.float64)))


def layer_problem(state: CompileState, layer: LayerPlan, io: LayerIO, y: np.ndarray,
                  weight_term: float = 0.0) -> LayerProblem:
    """The fit of ``layer`` starting from its current grid, with targets ``y`` [R, M] (pre-bias) and
    ``weight_term`` λ·E‖x‖²/K; spread over the M channels as ρ = that / M, it makes the loss
    ‖Y − Ŷ‖²/(R·M) + λ·tr(XᵀX)/(K·R·M)·‖W − Ŵ‖², BitSplit's weight term (``kernels.response.ridge``)
    in AdaQuant's per-element units."""
    grid = layer.grid
    w = channel_rows(layer.weight, layer.weight_channel_axis).astype(np.float32)
    step = (grid.scale.T if grid.block_size else grid.scale[:, None]).astype(np.float32)
    channels = w.shape[0]
    zeros = np.zeros(channels, np.float32)
    std = np.sqrt(np.maximum(np.var(y, axis=0, dtype=np.float64), 0.0))
    unit = np.maximum(std, 1e-3 * max(float(np.sqrt(np.mean(std**2))), 1e-12)).astype(np.float32)
    x_step, x_zero = (None, 0)
    if layer.activation_input:
        s, z = state.plan.act_params(layer.input_name)
        x_step, x_zero = float(s), int(z)
    return LayerProblem(
        weight=w, w_step=step, block=grid.block_size or w.shape[1], w_range=(grid.low, grid.qmax),
        groups=io.groups, bias=zeros if layer.bias is None else layer.bias.astype(np.float32),
        fp32_bias=zeros if io.bias is None else io.bias, bias_unit=unit, learn_bias=layer.bias is not None,
        learn_weights=len(y) >= MIN_ROWS_PER_INPUT * io.k, x_step=x_step, x_zero=x_zero,
        x_range=(0, 2**state.plan.root(layer.input_name).bits - 1) if layer.activation_input else (0, 255),
        learn_x_step=movable_input_step(state, layer),
        x_step_max=_input_step_cap(state, layer, x_zero) if layer.activation_input else np.inf,
        bound=output_bound(state, layer), weight_term=weight_term / channels)


def write_checked(state: CompileState, layer: LayerPlan, io: LayerIO, problem: LayerProblem, result: Fit,
                  x_spec: RowSpec, y_spec: RowSpec, settings: Settings) -> Fit:
    """``write_back`` through ``write_if_better`` (``passes/checked.py``), with the loss of the layer
    as written on the rows the fit was judged on; returns the fit with the loss of what the plan now holds."""

    def written_loss() -> float:
        written = dataclasses.replace(layer_problem(state, layer, io, open_rows(y_spec)),
                                      weight_term=problem.weight_term, anchor=problem.anchor_weight())
        return full_loss(written, written.initial(), row_reader(x_spec, y_spec), held_rows(y_spec[1][0], settings.holdout))

    checked = write_if_better(state, layer, lambda: write_back(state, layer, problem, result), written_loss,
                              result.loss_rtn)
    return dataclasses.replace(result, loss=checked.loss)


def write_back(state: CompileState, layer: LayerPlan, problem: LayerProblem, result: Fit) -> None:
    """Write the fit into the plan: input grid, w = q·s_w with safe scales, grid scale, bias."""
    w, s_w, b, s_x = problem.solution(result.theta)
    grid = layer.grid
    axis = layer.weight_channel_axis
    if problem.learning()["x_scale"]:
        root = state.plan.root(layer.input_name)
        s = float(np.float32(s_x))
        root.lo, root.hi = -problem.x_zero * s, (root.qmax - problem.x_zero) * s  # affine_params gives s, z back
    s_w = s_w.astype(np.float32)
    if grid.block_size is None:
        layer.weight = from_channel_rows(w, axis, layer.weight.shape)
        if layer.bias is not None:
            layer.bias = b.astype(np.float32)
        scale = WeightGridPass._bias_safe(state, layer, s_w[:, 0])
        if resolve_target(state.options.target).int16_pairs and 2 * grid.qmax > PAIR_LIMIT:
            node = next(n for n in state.model.graph if n.name == layer.node)
            scale = WeightGridPass._pair_safe(layer, scale, attr(node, "group", 1))
        s_w = scale[:, None]
    elif layer.bias is not None:
        layer.bias = b.astype(np.float32)
    step = problem.repeat(s_w)
    codes = quantize(w, step, 0, grid.low, grid.qmax)
    layer.weight = from_channel_rows(codes.astype(np.float32) * step, axis, layer.weight.shape)
    grid.scale = np.ascontiguousarray(s_w.T) if grid.block_size else s_w[:, 0]
