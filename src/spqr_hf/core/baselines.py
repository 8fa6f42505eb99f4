"""Baselines that share the engine, so comparisons differ only in the method."""

from __future__ import annotations

import dataclasses

import torch

from spqr_hf.core.params import SpQRParams
from spqr_hf.core.spqr import SpQRResult, spqr_quantize


def round_to_nearest(weight: torch.Tensor, params: SpQRParams) -> SpQRResult:
    """Round-to-nearest on the same grid: with H = I and no damping, U = I and GPTQ's error
    feedback vanishes, so the engine reduces exactly to per-group min-max rounding."""
    rtn = dataclasses.replace(params, outlier_threshold=float("inf"), damp_percent=0.0, act_order=False)
    eye = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
    return spqr_quantize(weight, eye, rtn)


def gptq_params(params: SpQRParams, damp_percent: float | None = None) -> SpQRParams:
    """GPTQ on the same grid: no outliers, plain float16 statistics (no second level)."""
    return dataclasses.replace(
        params, outlier_threshold=float("inf"), qq_scale_bits=16, qq_zero_bits=16,
        damp_percent=params.damp_percent if damp_percent is None else damp_percent,
    )
