"""Outlier criteria of SpQR section 3.3: the layer threshold and the leave-one-out group fit.

Groups are passed transposed, ``[g, m]`` (one input column per row), as the engine stores them:
reductions over the group then run over dim 0, which is several times faster on CPU.
"""

from __future__ import annotations

import torch

from spqr_hf.core.quant_grid import quantize_dequantize


def outlier_threshold(weight_t: torch.Tensor, inv_chol_diag: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau * mean_j(var_rows(W[:, j]) / d_j^2)`` for ``weight_t`` = W^T [n, m]: makes tau scale-free."""
    var = weight_t.var(dim=1, unbiased=weight_t.shape[1] > 1)
    return tau * (var / inv_chol_diag.square()).mean()


def _weighted_sq_error(
    group: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, maxq: int, d: torch.Tensor
) -> torch.Tensor:
    """Per-weight ``((w - q(w)) / d)^2`` [g, m] on the min-max grid spanned by per-row ``lo``/``hi``."""
    scale = ((hi - lo) / maxq).clamp_min(torch.finfo(group.dtype).tiny)
    zero = -lo / scale
    return ((group - quantize_dequantize(group, scale, zero, maxq)) / d[:, None]).square()


def _second_extreme(group: torch.Tensor, extreme: torch.Tensor, is_extreme: torch.Tensor, fill: float) -> torch.Tensor:
    """The row's min (max) once one weight holding it is left out: itself again if it is tied."""
    tied = is_extreme.to(group.dtype).sum(dim=0) > 1
    others = group.masked_fill(is_extreme, fill)
    runner_up = others.amin(dim=0) if fill > 0 else others.amax(dim=0)
    return torch.where(tied, extreme, runner_up)


def leave_one_out_reduction(group: torch.Tensor, inv_chol_diag: torch.Tensor, maxq: int) -> torch.Tensor:
    """How much each weight's exclusion from the min-max fit lowers its row's group error.

    ``group`` is ``[g, m]`` (g >= 2), ``inv_chol_diag`` the ``[g]`` matching d_j. The error is
    the d-scaled squared error of the other weights (the excluded one becomes an outlier and
    costs nothing). Excluding a weight changes the fit only if it is the row's unique min or
    max, so three fits (all weights, without the min, without the max) give every
    leave-one-out error at once instead of g separate fits.
    """
    lo, hi = group.amin(dim=0), group.amax(dim=0)
    is_lo, is_hi = group == lo, group == hi
    base = _weighted_sq_error(group, lo, hi, maxq, inv_chol_diag)
    base_total = base.sum(dim=0)
    reduction = base  # a generic weight leaves the fit unchanged: total - (total - own error)
    for is_ext, lo_k, hi_k in (
        (is_lo, _second_extreme(group, lo, is_lo, float("inf")), hi),
        (is_hi, lo, _second_extreme(group, hi, is_hi, float("-inf"))),
    ):
        err = _weighted_sq_error(group, lo_k, hi_k, maxq, inv_chol_diag)
        loo_error = err.sum(dim=0) - err  # valid at the extreme's own position
        # Where the extreme is tied, lo_k/hi_k equal lo/hi and this reproduces `base` anyway.
        reduction = torch.where(is_ext, base_total - loo_error, reduction)
    return reduction


def without_likely_outliers(
    group: torch.Tensor, inv_chol_diag: torch.Tensor, maxq: int, threshold: torch.Tensor
) -> torch.Tensor:
    """``group`` [g, m] with its likely outliers replaced by the mean of the row's other weights.

    Likely outliers (leave-one-out reduction above ``threshold``) will be stored sparsely, so
    they should neither stretch the min-max range nor steer the choice of statistics.
    """
    if group.shape[0] < 2:
        return group
    likely = leave_one_out_reduction(group, inv_chol_diag, maxq) > threshold
    keep = (~likely).to(group.dtype)
    mean_kept = (group * keep).sum(dim=0) / keep.sum(dim=0).clamp_min(1)
    return torch.where(likely, mean_kept, group)
