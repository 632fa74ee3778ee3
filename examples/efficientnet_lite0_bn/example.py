"""EfficientNet-Lite0 exported with its BatchNorms as explicit nodes (the unfolded variant).

Same weights, data and metrics as ``examples/efficientnet_lite0``; only the graph differs: every
Conv is followed by a ``BatchNormalization`` node. onnxptq folds them during fusion and keeps each
BN's γ, β in the plan, so this variant is where BN re-estimation towards the recorded BN statistics
(``--pipeline bn-reestimate:layers=bn,target=bn``) can be compared with re-estimation towards the
measured fp32 statistics (the default ``light`` pipeline).
"""

from __future__ import annotations

from pathlib import Path

from examples.efficientnet_lite0 import example as base

NAME = "efficientnet_lite0_bn"
PRIMARY = base.PRIMARY
HIGHER_IS_BETTER = base.HIGHER_IS_BETTER
eval_set = base.eval_set
calibration_set = base.calibration_set
metrics = base.metrics
sample_errors = base.sample_errors
agreement = base.agreement


def fp32_model() -> Path:
    """The fp32 model with explicit BatchNormalization nodes."""
    return base.fp32_model(fold_bn=False)
