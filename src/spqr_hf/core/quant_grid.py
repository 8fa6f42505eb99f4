"""First-level asymmetric min-max grid per output row (SpQR section 3.2, GPTQ's quantizer)."""

from __future__ import annotations

import torch

from spqr_hf.format.layout import affine

MAX_ZERO = 2.0**14  # bound on |zero point|: finite in float16 and in its second-level quantization


def fit_minmax(values: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row ``(scale, zero)`` of a column group ``values`` [g, m] (transposed: one input
    column per row, so reductions run over dim 0): scale=(max-min)/maxq, zero=-min/scale.

    The zero point stays fractional and min/max need not straddle 0 (paper, not GPTQ), but its
    magnitude is bounded by ``MAX_ZERO`` (the scale grows instead for nearly flat groups).
    Rows whose values are all equal get the mean positive scale of the other rows (1 if
    none): any positive scale reproduces a constant row, and a typical one keeps the
    second-level quantization of the scale vector tight.
    """
    lo, hi = values.amin(dim=0), values.amax(dim=0)
    # A nearly flat group far from 0 would get a tiny scale and a zero point beyond float16
    # (|zero| = |lo| / scale): keep |zero| <= MAX_ZERO; a flat group is still reproduced.
    scale = torch.maximum((hi - lo) / maxq, torch.maximum(lo.abs(), hi.abs()) / MAX_ZERO)
    positive = scale > 0
    fallback = torch.where(
        positive.any(), scale.sum() / positive.sum().clamp_min(1), torch.ones((), device=scale.device)
    )
    scale = torch.where(positive, scale, fallback)
    return scale, -lo / scale


def quantize_to_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Float codes ``clamp(round(values / scale + zero), 0, maxq)``; a zero scale maps to ``round(zero)``."""
    inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    return torch.clamp(torch.round(values * inv + zero), 0, maxq)


def quantize_dequantize(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round trip through the grid; broadcasting follows ``values``."""
    return affine(quantize_to_codes(values, scale, zero, maxq), scale, zero)
