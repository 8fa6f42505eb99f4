"""Pure tensor algorithm of SpQR: no nn.Module, no transformers."""

from spqr_hf.core.baselines import gptq_params, round_to_nearest
from spqr_hf.core.hessian import HessianAccumulator
from spqr_hf.core.params import WHOLE_ROW, SpQRParams
from spqr_hf.core.spqr import SpQRResult, spqr_quantize

__all__ = ["WHOLE_ROW", "HessianAccumulator", "SpQRParams", "SpQRResult", "gptq_params",
           "round_to_nearest", "spqr_quantize"]
