"""transformers integration: registration, the HfQuantizer, module surgery, model card."""

from spqr_hf.hf.integration import CheckpointError, dequantize_model, replace_with_spqr_placeholders
from spqr_hf.hf.quantizer import SpQRHfQuantizer
from spqr_hf.hf.register import is_registered, register

__all__ = ["CheckpointError", "SpQRHfQuantizer", "dequantize_model", "is_registered", "register",
           "replace_with_spqr_placeholders"]
