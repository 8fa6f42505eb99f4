"""The one place that chooses how an SpQR linear runs.

Normally the ``spqr_hf::spqr_linear`` operator, whose dispatcher picks the native kernel
registered for the input's device (CPU / CUDA) and otherwise the torch reference.
``SPQR_HF_BACKEND=torch`` forces the reference path everywhere (debugging, comparisons).
"""

from __future__ import annotations

import os

import torch

from spqr_hf.format.pack import PackedSpQR
from spqr_hf.ops import _schema
from spqr_hf.ops.reference import spqr_linear_reference


def force_reference() -> bool:
    """Whether the environment asks for the pure-torch path."""
    return os.environ.get("SPQR_HF_BACKEND", "").lower() == "torch"


def spqr_linear(x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for the packed weight ``W``, on the best backend for ``x.device``."""
    if force_reference():
        return spqr_linear_reference(x, packed, bias)
    return torch.ops.spqr_hf.spqr_linear(x, *_schema.op_args(packed, bias))
