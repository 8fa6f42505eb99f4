"""Packing and unpacking of the SpQR layout (see :mod:`spqr_hf.format.layout`), in pure torch.

:func:`dequantize` here is the reference decoder: tests use it as the oracle for the native
kernels, and the engine reconstructs weights with the same :func:`~layout.affine` formula.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from spqr_hf.format import layout
from spqr_hf.format.layout import RAW_STAT_BITS, WORD_BITS, affine

_MASK32 = (1 << WORD_BITS) - 1


def _chunk_positions(bits: int) -> list[tuple[int, int]]:
    """(word, shift) of each of the 32 codes of a chunk: 32 codes of ``bits`` fill ``bits`` words."""
    return [divmod(k * bits, WORD_BITS) for k in range(WORD_BITS)]


def pack_bits_transposed(codes_t: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes given position-major, ``codes_t`` [count, rows], into int32 streams [rows, words].

    Works on chunks of 32 codes, which occupy exactly ``bits`` words: 32 vectorised steps over
    contiguous ``[count / 32, rows]`` slices instead of per-bit work on the whole matrix.
    """
    if codes_t.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D code matrix, got shape {tuple(codes_t.shape)}")
    count, rows = codes_t.shape
    if codes_t.numel() and (int(codes_t.min()) < 0 or int(codes_t.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    n_chunks = (count + WORD_BITS - 1) // WORD_BITS
    padded = torch.nn.functional.pad(codes_t, (0, 0, 0, n_chunks * WORD_BITS - count)).view(n_chunks, WORD_BITS, rows)
    words = torch.zeros(bits + 1, n_chunks, rows, dtype=torch.int64, device=codes_t.device)
    for k, (word, shift) in enumerate(_chunk_positions(bits)):
        shifted = padded[:, k].to(torch.int64) << shift
        words[word] |= shifted & _MASK32
        if shift + bits > WORD_BITS:
            words[word + 1] |= shifted >> WORD_BITS
    words = words[:bits].permute(2, 1, 0).reshape(rows, n_chunks * bits)[:, : layout.words_for(count, bits)]
    # contiguous: with one chunk (<= 32 codes per row) the reshape above is a transposed view, and the CPU
    # op would copy such a stream on every call.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes ``[rows, count]`` (< 2**bits) into int32 bit streams ``[rows, words]``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D code matrix, got shape {tuple(codes.shape)}")
    return pack_bits_transposed(codes.t().contiguous(), bits)


def unpack_bits(words: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 streams ``[rows, words]`` to int64 codes ``[rows, count]``.

    The result is a transposed (column-major) view; call ``.contiguous()`` if that matters.
    """
    rows = words.shape[0]
    n_chunks = (count + WORD_BITS - 1) // WORD_BITS
    # Position-major words, zero-padded so every chunk can also read its next word.
    w64 = torch.nn.functional.pad(words.to(torch.int64) & _MASK32, (0, n_chunks * bits + 1 - words.shape[1])).t()
    codes = torch.empty(n_chunks, WORD_BITS, rows, dtype=torch.int64, device=words.device)
    mask = (1 << bits) - 1
    span = n_chunks * bits
    for k, (word, shift) in enumerate(_chunk_positions(bits)):
        window = w64[word:word + span:bits] >> shift
        if shift + bits > WORD_BITS:
            window |= w64[word + 1:word + 1 + span:bits] << (WORD_BITS - shift)
        codes[:, k] = window & mask
    return codes.view(n_chunks * WORD_BITS, rows)[:count].t()


@dataclass
class PackedSpQR:
    """All packed tensors of one quantized linear layer plus the integers needed to read them.

    ``groupsize`` and ``qq_groupsize`` are effective sizes ("whole row" already resolved).
    """

    in_features: int
    out_features: int
    bits: int
    groupsize: int
    qq_groupsize: int
    scale_bits: int
    zero_bits: int
    qweight: torch.Tensor
    scale_codes: torch.Tensor
    zero_codes: torch.Tensor
    scale_meta: torch.Tensor | None
    zero_meta: torch.Tensor | None
    perm: torch.Tensor
    outlier_row_ptr: torch.Tensor
    outlier_col: torch.Tensor
    outlier_delta: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.outlier_col.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed buffers by layout name (absent meta tensors omitted)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    def storage_bits(self) -> int:
        """Bits actually stored by the packed buffers (bias excluded)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first tensor whose shape, dtype or indices are wrong.

        Cheap enough to run at load time; kernels may then trust every index.
        """
        expected = layout.buffer_shapes(
            self.in_features, self.out_features, self.bits, self.groupsize,
            self.qq_groupsize, self.scale_bits, self.zero_bits, self.nnz,
        )
        present = self.tensors()
        for name, (shape, dtype) in expected.items():
            if name not in present:
                raise ValueError(f"packed tensor '{name}' is missing")
            t = present[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"packed tensor '{name}' has shape {tuple(t.shape)} and dtype {t.dtype}; "
                    f"expected {shape} and {dtype} (corrupted or mismatched checkpoint?)"
                )
        for name in present.keys() - expected.keys():
            raise ValueError(f"unexpected packed tensor '{name}' for this configuration")
        perm = layout.from_uint16_storage(self.perm)
        if self.in_features and not torch.equal(
            torch.sort(perm.cpu()).values, torch.arange(self.in_features)
        ):
            raise ValueError("packed tensor 'perm' is not a permutation of the input columns")
        row_ptr = self.outlier_row_ptr.to(torch.int64).cpu()
        if row_ptr[0] != 0 or row_ptr[-1] != self.nnz or bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise ValueError("packed tensor 'outlier_row_ptr' is not a valid CSR row pointer")
        if self.nnz:
            cols = layout.from_uint16_storage(self.outlier_col).cpu()
            if int(cols.max()) >= self.in_features:
                raise ValueError("packed tensor 'outlier_col' holds a column index out of range")
            rows = torch.repeat_interleave(torch.arange(self.out_features), row_ptr.diff())
            same_row = rows[1:] == rows[:-1]
            if bool((same_row & (cols[1:] <= cols[:-1])).any()):
                raise ValueError("packed tensor 'outlier_col' is not strictly increasing within a row")


def decode_statistic(
    codes: torch.Tensor, meta: torch.Tensor | None, rows: int, bits: int, qq_groupsize: int
) -> torch.Tensor:
    """First-level statistics ``[G, rows]`` in float32 from their packed codes and meta."""
    raw = unpack_bits(codes, rows, bits)
    if bits == RAW_STAT_BITS:
        return layout.to_uint16_storage(raw).view(torch.float16).to(torch.float32)
    if meta is None:
        raise ValueError(f"{bits}-bit statistics need their float16 meta tensor")
    chunk = torch.arange(rows, device=codes.device) // qq_groupsize
    return affine(raw, meta[:, chunk, layout.META_STEP], meta[:, chunk, layout.META_ZERO])


def dequantize(packed: PackedSpQR) -> torch.Tensor:
    """Dense float32 ``[out, in]`` weight, bit-identical to the engine's reconstruction."""
    m, n = packed.out_features, packed.in_features
    codes = unpack_bits(packed.qweight, n, packed.bits)
    scale = decode_statistic(packed.scale_codes, packed.scale_meta, m, packed.scale_bits, packed.qq_groupsize)
    zero = decode_statistic(packed.zero_codes, packed.zero_meta, m, packed.zero_bits, packed.qq_groupsize)
    group = torch.arange(n, device=codes.device) // packed.groupsize
    w_perm = affine(codes, scale.t()[:, group], zero.t()[:, group])
    if packed.nnz:
        row_ptr = packed.outlier_row_ptr.to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(m, device=codes.device), row_ptr.diff())
        cols = layout.from_uint16_storage(packed.outlier_col)
        w_perm[rows, cols] = w_perm[rows, cols] + packed.outlier_delta.to(torch.float32)
    weight = torch.empty_like(w_perm)
    weight[:, layout.from_uint16_storage(packed.perm)] = w_perm
    return weight
