"""The one place that chooses how an SpQR linear runs: a native kernel or the torch reference.

Backends register per device type (``"cpu"``, ``"cuda"``). ``SPQR_HF_BACKEND=torch`` forces the
reference path everywhere (for debugging and for comparing against the kernels).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from spqr_hf.format.pack import PackedSpQR
from spqr_hf.ops.reference import spqr_linear_reference

LinearFn = Callable[[torch.Tensor, PackedSpQR, "torch.Tensor | None"], torch.Tensor]
_NATIVE: dict[str, LinearFn] = {}


def register_backend(device_type: str, fn: LinearFn) -> None:
    """Make ``fn`` the SpQR linear for tensors on ``device_type``."""
    _NATIVE[device_type] = fn


def backend_for(device: torch.device) -> LinearFn:
    """The function that will run an SpQR linear on ``device``."""
    if os.environ.get("SPQR_HF_BACKEND", "").lower() == "torch":
        return spqr_linear_reference
    return _NATIVE.get(device.type, spqr_linear_reference)


def spqr_linear(x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for the packed weight ``W``, on the best backend for ``x.device``."""
    return backend_for(x.device)(x, packed, bias)
