"""spqr_hf: SpQR (sparse-quantized representation) for Hugging Face transformers."""

from spqr_hf.config import SpQRConfig
from spqr_hf.core import HessianAccumulator, SpQRParams, spqr_quantize
from spqr_hf.format import FORMAT_VERSION
from spqr_hf.nn import SpQRLinear
from spqr_hf.quantize import quantize_weight

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "HessianAccumulator", "SpQRConfig", "SpQRLinear", "SpQRParams",
           "quantize_weight", "spqr_quantize"]
