"""The ``spqr_hf::spqr_linear`` operator: defined once here, implemented per device.

The pure-torch reference is registered as the default implementation for every device, so
the package works without native code; the C++/CUDA extensions register CPU / CUDA kernels for
the same schema (``TORCH_LIBRARY_IMPL(spqr_hf, CPU, m)``), which then take precedence. The fake
implementation gives shapes to ``torch.compile`` / meta tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spqr_hf.format.pack import PackedSpQR
from spqr_hf.ops.reference import spqr_linear_reference

OP_NAME = "spqr_hf::spqr_linear"
SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scale_codes, Tensor zero_codes, Tensor? scale_meta, "
    "Tensor? zero_meta, Tensor perm, Tensor outlier_row_ptr, Tensor outlier_col, Tensor outlier_delta, "
    "Tensor? bias, int in_features, int out_features, int bits, int groupsize, int qq_groupsize, "
    "int scale_bits, int zero_bits) -> Tensor"
)

torch.library.define(OP_NAME, SCHEMA)

# The CPU plane layout of the codes (csrc/include/spqr_hf/planes.h), a form SpQRLinear keeps on the CPU for
# decoding: CPU implementations only (spqr_hf._C).
PLANES_FROM_ROWS = "spqr_hf::planes_from_rows"
ROWS_FROM_PLANES = "spqr_hf::rows_from_planes"
torch.library.define(PLANES_FROM_ROWS, "(Tensor qweight, int in_features, int out_features, int bits) -> Tensor")
torch.library.define(ROWS_FROM_PLANES, "(Tensor planes, int in_features, int out_features, int bits) -> Tensor")
# ... and its block-major form of the statistics codes (where both streams fit it).
STAT_BLOCKS_FROM_ROWS = "spqr_hf::stat_blocks_from_rows"
STAT_ROWS_FROM_BLOCKS = "spqr_hf::stat_rows_from_blocks"
torch.library.define(STAT_BLOCKS_FROM_ROWS, "(Tensor codes, int out_features, int stat_bits) -> Tensor")
torch.library.define(STAT_ROWS_FROM_BLOCKS, "(Tensor blocks, int n_groups, int out_features, int stat_bits) -> Tensor")


def _packed_from_args(args: tuple) -> PackedSpQR:
    (qweight, scale_codes, zero_codes, scale_meta, zero_meta, perm, row_ptr, col, delta, _bias,
     in_features, out_features, bits, groupsize, qq_groupsize, scale_bits, zero_bits) = args
    return PackedSpQR(
        in_features=in_features, out_features=out_features, bits=bits, groupsize=groupsize,
        qq_groupsize=qq_groupsize, scale_bits=scale_bits, zero_bits=zero_bits, qweight=qweight,
        scale_codes=scale_codes, zero_codes=zero_codes, scale_meta=scale_meta, zero_meta=zero_meta,
        perm=perm, outlier_row_ptr=row_ptr, outlier_col=col, outlier_delta=delta,
    )


@torch.library.impl(OP_NAME, "default")
def _spqr_linear_default(x: torch.Tensor, *args) -> torch.Tensor:
    return spqr_linear_reference(x, _packed_from_args(args), args[9])


@torch.library.register_fake(OP_NAME)
def _spqr_linear_fake(x: torch.Tensor, *args) -> torch.Tensor:
    out_features = args[11]
    return x.new_empty((*x.shape[:-1], out_features))


def op_args(packed: PackedSpQR, bias: torch.Tensor | None) -> tuple:
    """Positional arguments (after ``x``) of the operator for one packed layer."""
    return (
        packed.qweight, packed.scale_codes, packed.zero_codes, packed.scale_meta, packed.zero_meta,
        packed.perm, packed.outlier_row_ptr, packed.outlier_col, packed.outlier_delta, bias,
        packed.in_features, packed.out_features, packed.bits, packed.groupsize, packed.qq_groupsize,
        packed.scale_bits, packed.zero_bits,
    )


def buffer_args(buffers: Mapping[str, torch.Tensor | None], geometry: tuple[int, ...]) -> tuple:
    """``op_args`` from a module's buffers (``PackedSpQR``'s tensor names and ``"bias"``) and its
    integer geometry (``PackedSpQR``'s integer fields, in order), without building a ``PackedSpQR``."""
    b = buffers
    return (
        b["qweight"], b["scale_codes"], b["zero_codes"], b["scale_meta"], b["zero_meta"], b["perm"],
        b["outlier_row_ptr"], b["outlier_col"], b["outlier_delta"], b["bias"], *geometry,
    )
