"""Pure-torch SpQR linear: dequantize with the reference decoder, then a float32 matmul.

Works on every device and is the oracle the native kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spqr_hf.format.pack import PackedSpQR, dequantize


def spqr_linear_reference(x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[..., in]``; accumulates in float32, returns ``x.dtype``."""
    weight = dequantize(packed)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), weight, b).to(x.dtype)
