"""Pipelines: which passes a compile runs, from a pipeline name or a spec string.

Every compile runs the core passes (fusion, select, calibration, weights and any weight solver placed
after them, then emission and verification). A pipeline adds correction passes between the weight
grids and emission, in the order given:

* ``light``    — ``bn-reestimate:layers=hidden,bias-correction``: CalibTIP's light pipeline without
  mixed precision, re-standardizing every hidden layer to its fp32 statistics (not only BN-folded
  ones, so models exported with BatchNorm folded get it too). The default: on EfficientNet-Lite0 it
  raised fp32 top-1 agreement from 0.896 to 0.939 at W8A8 and from 0.058 to 0.612 at W4A8.
* ``advanced`` — ``adaquant,bn-reestimate:layers=hidden,bias-tuning``: AdaQuant (per-layer fit of
  weights, bias and steps, ``passes/adaquant.py``, sequential mode), BN re-estimation, then bias
  tuning (``passes/bias_tuning.py``: bias correction, then all biases trained on the outputs' KL to
  fp32 on onnxruntime-training, judged on held-out calibration batches; without the training
  environment it stops after bias correction). At W4A8 on a host with VNNI (fp32 agreement; PP-OCR's
  CER): EfficientNet-Lite0 0.739 (light 0.612; tuning not kept), PP-OCR 0.925 / CER 0.022 (light
  0.922 / 0.030; with bias correction instead of tuning 0.896 / 0.062), magika 0.984 (0.977;
  onnxruntime-training crashes on its graph, so bias correction); at W4A4 (light in brackets) magika
  0.947 (0.943), MiniLM cosine 0.767 (0.340), PP-OCR 0.447 / CER 0.759 (0.428 / 0.846), EfficientNet-Lite0
  0.465 (0.550; label top-1 0.80 vs 0.65, mean KL 0.706 vs 0.739);
* a spec: comma-separated pass names, each optionally followed by ``:key=value`` options, e.g.
  ``bn-reestimate:target=bn,bias-correction:keep=always``. Core pass names may be listed (they always run
  in place), so ``calibration`` alone is the pipeline without corrections.

BN re-estimation and bias correction are each kept only where they bring the model's outputs nearer
fp32 on the calibration set (``passes/kept.py``; ``keep=always`` keeps them regardless).

Order matters after AdaQuant. Its least-squares fits leave each layer's output with a smaller spread
than fp32's (σ_q/σ_fp32 ≈ 0.9 per channel on EfficientNet-Lite0 at W4A8) and means that make up for it
through the clipped activations downstream. Bias correction matches means only: run on such a model
it moves each layer's mean to fp32's while the spread stays short, the next layers (fitted to the
uncorrected inputs) see more of their inputs clipped, and the spread shrinks layer after layer —
``bn-reestimate:layers=hidden,adaquant,bias-correction`` ends with σ_q/σ_fp32 at 0.2 in the classifier
and held-out cosine 0.30 (0.90 before it; ``adaquant,bias-correction``: 0.82 → 0.32, W4A8, 24 samples).
Re-standardizing after AdaQuant (``bn-reestimate``, as the named pipelines do) restores the spreads
first; ``order_warnings`` names a spec that does not.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from onnxptq.errors import InputError
from onnxptq.passes.adaquant import AdaQuantPass
from onnxptq.passes.bias_correction import BiasCorrectionPass
from onnxptq.passes.bias_tuning import BiasTuningPass
from onnxptq.passes.bn_reestimate import BNReestimatePass

CORRECTIONS: dict[str, type] = {p.name: p for p in (BNReestimatePass, BiasCorrectionPass, BiasTuningPass,
                                                   AdaQuantPass)}
NAMED = {"light": "bn-reestimate:layers=hidden,bias-correction",
         "advanced": "adaquant,bn-reestimate:layers=hidden,bias-tuning"}


def _option(cls: type, item: str, text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    types = {f.name: typing.get_type_hints(cls)[f.name] for f in fields}
    if not sep or key not in types:
        known = ", ".join(f"{k}=<{t.__name__}>" for k, t in types.items()) or "none"
        raise InputError(f"pipeline: bad option {text!r} in {item!r}; options of {cls.name}: {known}")
    try:
        return key, types[key](raw)
    except ValueError:
        raise InputError(f"pipeline: option {key} of {cls.name} takes {types[key].__name__}; got {raw!r}") from None


def order_warnings(passes: Sequence[Any]) -> list[str]:
    """A warning for each bias correction (or tuning, which starts with one) that follows AdaQuant with
    no BN re-estimation in between (module doc: it can collapse the model)."""
    warnings, fitted = [], False
    for p in passes:
        if p.name == AdaQuantPass.name:
            fitted = True
        elif p.name == BNReestimatePass.name:
            fitted = False
        elif p.name in (BiasCorrectionPass.name, BiasTuningPass.name) and fitted:
            warnings.append(f"pipeline: {p.name} follows adaquant with no bn-reestimate between them; bias "
                            "correction then matches means but not spreads and can collapse the model (on "
                            "EfficientNet-Lite0 held-out cosine 0.82 → 0.32); put bn-reestimate:layers=hidden "
                            f"before {p.name}, as the advanced pipeline does")
    return warnings


def correction_passes(spec: str, core: Sequence[str]) -> list[Any]:
    """The correction passes of pipeline ``spec`` (a name or a spec string), configured; ``core`` are
    the names of the passes that always run (accepted in a spec and skipped)."""
    text = NAMED.get(spec, spec)
    passes, seen = [], set()
    for item in (i.strip() for i in text.split(",")):
        name, *options = item.split(":")
        if name in core:
            if options:
                raise InputError(f"pipeline: {name!r} is a core pass and takes no options here")
            continue
        if "=" in name:
            raise InputError(f"pipeline: {item!r} in {spec!r} is an option without a pass; a pass's options "
                             "follow it separated by ':', e.g. bn-reestimate:layers=bn:target=bn")
        if name not in CORRECTIONS:
            raise InputError(f"pipeline: unknown pass {name!r} in {spec!r}; choose from "
                             f"{', '.join(CORRECTIONS)} (or a pipeline: {', '.join(NAMED)})")
        if name in seen:
            raise InputError(f"pipeline: {name!r} is listed twice in {spec!r}")
        seen.add(name)
        cls = CORRECTIONS[name]
        passes.append(cls(**dict(_option(cls, item, o) for o in options)))
    return passes


def build(spec: str, core: Sequence[type]) -> list[Any]:
    """Instances of the ``core`` pass classes with the corrections of ``spec`` inserted before emission."""
    names = [p.name for p in core]
    at = names.index("emission")
    return [*(p() for p in core[:at]), *correction_passes(spec, names), *(p() for p in core[at:])]
