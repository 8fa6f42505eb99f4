"""``quantize_weight``: the engine's result as a ready ``SpQRLinear`` module."""

from __future__ import annotations

from typing import Any

import torch

from spqr_hf.core.params import SpQRParams
from spqr_hf.core.spqr import spqr_quantize
from spqr_hf.nn.linear import SpQRLinear


def as_params(config: Any) -> SpQRParams:
    """Engine settings from an ``SpQRParams`` or anything with ``engine_params()`` (``SpQRConfig``)."""
    if isinstance(config, SpQRParams):
        return config
    if hasattr(config, "engine_params"):
        return config.engine_params()
    raise TypeError(f"expected SpQRConfig or SpQRParams, got {type(config).__name__}")


def quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, config: Any, bias: torch.Tensor | None = None
) -> SpQRLinear:
    """Quantize one linear layer's weight [out, in] with its input Hessian [in, in]."""
    result = spqr_quantize(weight, hessian, as_params(config))
    return SpQRLinear.from_packed(result.packed, bias)
