"""Loads the CUDA kernels (``spqr_hf._C_cuda``) once, quietly, and remembers why they did not load.

Importing ``_C_cuda`` registers a CUDA kernel for the ``spqr_hf::spqr_linear`` operator (the
schema in :mod:`spqr_hf.ops._schema` is imported first). It is built by setup.py only where a
CUDA toolkit and a CUDA build of torch were present at install time; elsewhere its absence is
normal, so nothing is warned: CUDA tensors then take the pure-torch reference path, and
:func:`load_error` says why.
"""

from __future__ import annotations

from types import ModuleType

import torch

from spqr_hf.ops import _schema
from spqr_hf.ops._optional import OptionalExtension

_CUDA = OptionalExtension(
    "spqr_hf._C_cuda",
    unavailable_reason=lambda: None if torch.version.cuda is not None else (
        "torch is a CPU-only build (torch.version.cuda is None); the CUDA kernels are not built"),
)


def load() -> ModuleType | None:
    """Import ``spqr_hf._C_cuda`` on the first call; later calls are free. Never raises."""
    return _CUDA.load()


def cuda_kernels_available() -> bool:
    """Whether ``spqr_hf._C_cuda`` is loaded and serves ``spqr_linear`` on CUDA tensors."""
    return load() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_schema.OP_NAME, "CUDA")


def load_error() -> str | None:
    """Why ``spqr_hf._C_cuda`` did not load, or None when it did (or was not tried yet)."""
    return _CUDA.load_error()
