"""onnxptq: a post-training quantization compiler for ONNX models.

``onnxptq.compile(model, calib, output, **options)`` turns an fp32 ONNX model and unlabeled
calibration data into a QDQ model that onnxruntime runs on its integer CPU kernels.
"""

from onnxptq.api import CompileResult, check_budgets, compile, evaluate, planned_state
from onnxptq.data import CalibrationSet, ImageOptions, load_calibration
from onnxptq.errors import BudgetError, InputError, OnnxptqError
from onnxptq.state import CompileOptions

__all__ = ["CalibrationSet", "CompileOptions", "CompileResult", "BudgetError", "ImageOptions", "InputError",
           "OnnxptqError", "check_budgets", "compile", "evaluate", "load_calibration", "planned_state"]
__version__ = "0.1.0"
