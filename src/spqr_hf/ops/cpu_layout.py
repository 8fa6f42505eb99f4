"""The CPU plane layout of a layer's codes (``csrc/include/spqr_hf/planes.h``): when a layer takes it
and the conversions both ways.

On CPUs whose kernels have it (AVX2), a layer's ``qweight`` row streams are rearranged into bit planes
of 32-row blocks, which a table-lookup matvec reads for bfloat16 decoding. It is a form of the same
codes held in memory instead of the row streams (one copy), never a checkpoint format: ``SpQRLinear``
converts back for saving, moving and other dtypes. The bit layout lives in the native code alone.
"""

from __future__ import annotations

import os

import torch

from spqr_hf.ops import _extension, _schema  # noqa: F401  (_schema defines the conversion operators)


def wanted() -> bool:
    """False when ``SPQR_HF_CPU_LAYOUT=rows`` asks layers to keep the row streams (comparisons, debugging);
    read when a layer chooses its layout, not on every call."""
    return os.environ.get("SPQR_HF_CPU_LAYOUT", "").lower() != "rows"


def kernels_available() -> bool:
    """Whether the CPU kernels in use now (``SPQR_HF_CPU_ISA`` honoured) have the plane-layout kernels."""
    module = _extension.load()
    return module is not None and bool(module.plane_kernels())


def layer_fits(in_features: int, groupsize: int, bits: int) -> bool:
    """Whether a layer's codes can take the plane layout (2-4 bits, groups of 16 columns)."""
    module = _extension.load()
    return module is not None and bool(module.plane_layout_fits(in_features, groupsize, bits))


def to_planes(qweight: torch.Tensor, in_features: int, out_features: int, bits: int) -> torch.Tensor:
    """``qweight``'s int32 row streams as the plane layout (a flat uint8 tensor)."""
    return torch.ops.spqr_hf.planes_from_rows(qweight, in_features, out_features, bits)


def to_rows(planes: torch.Tensor, in_features: int, out_features: int, bits: int) -> torch.Tensor:
    """The plane layout back as ``qweight``'s int32 row streams, bit for bit."""
    return torch.ops.spqr_hf.rows_from_planes(planes, in_features, out_features, bits)
