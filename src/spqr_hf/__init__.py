"""spqr_hf: SpQR (sparse-quantized representation) for Hugging Face transformers.

Importing it registers SpQR as transformers' "spqr" quantization method.
"""

from spqr_hf.calibrate import CalibrationDataError, QuantizationReport, get_calibration_data, quantize_model
from spqr_hf.config import SpQRConfig
from spqr_hf.core import HessianAccumulator, SpQRParams, spqr_quantize
from spqr_hf.format import FORMAT_VERSION
from spqr_hf.hf import CheckpointError, SpQRHfQuantizer, register
from spqr_hf.nn import SpQRLinear
from spqr_hf.quantize import quantize_weight

register()

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "CalibrationDataError", "CheckpointError", "HessianAccumulator", "QuantizationReport",
           "SpQRConfig", "SpQRHfQuantizer", "SpQRLinear", "SpQRParams", "get_calibration_data", "quantize_model",
           "quantize_weight", "spqr_quantize"]
