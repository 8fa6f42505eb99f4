"""Register spqr_hf as transformers' "spqr" quantization method (run once, on ``import spqr_hf``).

transformers' own "spqr" entry only loads checkpoints of the original CUDA-only 3-bit layout and
is broken in 5.x; ``register_quantizer`` refuses a taken name, so the two mappings (plain
dicts) are updated directly. The saved config's ``format`` field tells the layouts apart.
"""

from __future__ import annotations

from transformers.quantizers import auto

from spqr_hf.config import QUANT_METHOD, SpQRConfig
from spqr_hf.hf.quantizer import SpQRHfQuantizer


def register() -> None:
    """Point transformers' "spqr" method at spqr_hf's config and quantizer (idempotent)."""
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = SpQRConfig
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = SpQRHfQuantizer


def is_registered() -> bool:
    return (auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is SpQRConfig
            and auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is SpQRHfQuantizer)
