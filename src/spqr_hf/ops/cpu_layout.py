"""The CPU plane form of a layer (``csrc/include/spqr_hf/planes.h``): when a layer takes it and the
conversions both ways.

On CPUs whose kernels have it (AVX2 and AVX-512, not AMX), a layer's ``qweight`` row streams are
rearranged into bit planes of 32-row blocks, which a table-lookup matvec reads for decoding (bfloat16,
float16 and float32), and its second-level parameters ``scale_meta`` / ``zero_meta`` become chunk-major
(``[R, G, 2]`` instead of ``[G, R, 2]``), held as int16 (the same float16 bits) so that the operator
tells the forms apart by dtype even where ``R == G``. Where both statistics streams have the same width
of 2-4 bits and ``qq_groupsize`` is a multiple of 16, ``scale_codes`` / ``zero_codes`` become block-major
too (flat uint8: each 32-row block's codes of every group in a row), read in order instead of a row apart
per group. It is a form of the same tensors held in memory instead of the checkpoint's (one copy), never a
checkpoint format: ``SpQRLinear`` converts back for saving and moving. The bit layout lives in the native
code alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

from spqr_hf.format.pack import PackedSpQR
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


# The buffers the plane form changes (the operator tells the forms apart by dtype: qweight and the
# statistics codes uint8, the second-level parameters int16).
PLANE_BUFFERS = ("qweight", "scale_codes", "zero_codes", "scale_meta", "zero_meta")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the conversions need of a layer: ``PackedSpQR``'s integer fields of the same names."""

    in_features: int
    out_features: int
    bits: int
    qq_groupsize: int
    scale_bits: int
    zero_bits: int

    @classmethod
    def of(cls, layer: object) -> Geometry:
        """From anything with those attributes (``PackedSpQR``, ``SpQRLinear``)."""
        return cls(*(getattr(layer, field.name) for field in dataclasses.fields(cls)))

    @property
    def stat_blocks(self) -> bool:
        """Whether the statistics codes take the block-major form too."""
        module = _extension.load()
        return module is not None and bool(module.stat_blocks_fit(
            self.scale_bits, self.zero_bits, min(self.qq_groupsize, self.out_features)))


def buffers_to_planes(buffers: Mapping[str, torch.Tensor | None], geometry: Geometry) -> dict[str, torch.Tensor | None]:
    """The plane form of a layer's ``PLANE_BUFFERS`` (new tensors, or the same ones where they keep the
    checkpoint form) from their checkpoint form."""
    g = geometry
    stat_blocks = g.stat_blocks
    return {"qweight": to_planes(buffers["qweight"], g.in_features, g.out_features, g.bits),
            "scale_codes": _stat_blocks(buffers["scale_codes"], g.out_features, g.scale_bits) if stat_blocks
            else buffers["scale_codes"],
            "zero_codes": _stat_blocks(buffers["zero_codes"], g.out_features, g.zero_bits) if stat_blocks
            else buffers["zero_codes"],
            "scale_meta": _transposed(buffers.get("scale_meta"), torch.int16),
            "zero_meta": _transposed(buffers.get("zero_meta"), torch.int16)}


def packed_to_planes(packed: PackedSpQR) -> PackedSpQR:
    """A packed layer with its ``PLANE_BUFFERS`` in the plane form, for calling the operator on that form
    directly (tests, benchmarks); ``SpQRLinear`` converts its own buffers."""
    return dataclasses.replace(packed, **buffers_to_planes(packed.tensors(), Geometry.of(packed)))


def buffers_to_rows(buffers: Mapping[str, torch.Tensor | None], geometry: Geometry) -> dict[str, torch.Tensor | None]:
    """The checkpoint form of a layer's ``PLANE_BUFFERS`` (new tensors, or the same ones where they kept
    it) from their plane form, bit for bit."""
    g = geometry
    n_groups = g.in_features // 16  # the plane layout's groups

    def stat_rows(codes: torch.Tensor, stat_bits: int) -> torch.Tensor:
        if codes.dtype != torch.uint8:
            return codes
        return torch.ops.spqr_hf.stat_rows_from_blocks(codes, n_groups, g.out_features, stat_bits)

    return {"qweight": to_rows(buffers["qweight"], g.in_features, g.out_features, g.bits),
            "scale_codes": stat_rows(buffers["scale_codes"], g.scale_bits),
            "zero_codes": stat_rows(buffers["zero_codes"], g.zero_bits),
            "scale_meta": _transposed(buffers.get("scale_meta"), torch.float16),
            "zero_meta": _transposed(buffers.get("zero_meta"), torch.float16)}


def _stat_blocks(codes: torch.Tensor, out_features: int, stat_bits: int) -> torch.Tensor:
    """A statistics stream set's int32 row streams as the block-major form (flat uint8)."""
    return torch.ops.spqr_hf.stat_blocks_from_rows(codes, out_features, stat_bits)


def _transposed(meta: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Second-level parameters ``[a, b, 2]`` as ``[b, a, 2]`` (group-major <-> chunk-major), their bits
    viewed as ``dtype`` (int16 in the plane form, float16 in the checkpoint's), or None."""
    return None if meta is None else meta.transpose(0, 1).contiguous().view(dtype)


def to_planes(qweight: torch.Tensor, in_features: int, out_features: int, bits: int) -> torch.Tensor:
    """``qweight``'s int32 row streams as the plane layout (a flat uint8 tensor)."""
    return torch.ops.spqr_hf.planes_from_rows(qweight, in_features, out_features, bits)


def to_rows(planes: torch.Tensor, in_features: int, out_features: int, bits: int) -> torch.Tensor:
    """The plane layout back as ``qweight``'s int32 row streams, bit for bit."""
    return torch.ops.spqr_hf.rows_from_planes(planes, in_features, out_features, bits)
