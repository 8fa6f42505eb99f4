"""Second-level quantization of first-level statistics (SpQR section 3.2, "bilevel")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spqr_hf.format.layout import RAW_STAT_BITS, affine

# Keep |zero| = |min| / step below this, so the float16 zero point can neither overflow nor
# lose the statistic's magnitude when a chunk's values are nearly equal.
_MAX_RELATIVE_ZERO = 1024.0
_MIN_STEP = 2.0**-24  # smallest positive float16
_MAX_STEP = 2.0**15  # well inside float16 (65504)


@dataclass
class QuantizedStatistic:
    """Codes ``[m]`` (int64), float16 meta ``[R, 2]`` (None when raw) and decoded float32 values ``[m]``."""

    codes: torch.Tensor
    meta: torch.Tensor | None
    decoded: torch.Tensor


def quantize_statistic(values: torch.Tensor, bits: int, qq_groupsize: int) -> QuantizedStatistic:
    """Min-max quantize a per-row statistic vector in chunks of ``qq_groupsize`` rows.

    The decoded values use the float16-rounded step and zero exactly as the decoder will.
    With ``bits == 16`` the statistic is stored as its float16 bit pattern (no second level).
    """
    if bits == RAW_STAT_BITS:
        half = values.to(torch.float16)
        return QuantizedStatistic(half.view(torch.int16).to(torch.int64) & 0xFFFF, None, half.to(torch.float32))
    if not bool(torch.isfinite(values).all()):
        raise ValueError("non-finite group statistic: the weights or the Hessian produced NaN/inf during quantization")
    m = values.shape[0]
    n_chunks = (m + qq_groupsize - 1) // qq_groupsize
    padded = torch.cat([values, values[-1:].expand(n_chunks * qq_groupsize - m)])  # edge value: same min/max
    chunks = padded.view(n_chunks, qq_groupsize)
    lo, hi = chunks.amin(dim=1), chunks.amax(dim=1)
    maxq = (1 << bits) - 1
    absmax = torch.maximum(lo.abs(), hi.abs())
    step = torch.maximum((hi - lo) / maxq, absmax / _MAX_RELATIVE_ZERO).clamp(_MIN_STEP, _MAX_STEP)
    step16 = step.to(torch.float16)
    zero16 = (-lo / step16.to(torch.float32)).to(torch.float16)
    meta = torch.stack([step16, zero16], dim=1)
    row_chunk = torch.arange(m, device=values.device) // qq_groupsize
    row_step, row_zero = step16[row_chunk].to(torch.float32), zero16[row_chunk].to(torch.float32)
    codes = torch.clamp(torch.round(values / row_step + row_zero), 0, maxq)
    return QuantizedStatistic(codes.to(torch.int64), meta, affine(codes, row_step, row_zero))
