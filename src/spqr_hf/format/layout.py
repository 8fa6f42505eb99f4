"""The SpQR packed layout: the one definition every packer, reference path and kernel follows.

Mirrored constant-for-constant by ``csrc/include/spqr_hf/layout.h``; change both or neither,
and bump ``FORMAT_VERSION``.

Notation: ``m`` = out_features (rows), ``n`` = in_features (columns), ``b`` = weight bits,
``g`` = groupsize (first-level group, paper beta1) over *permuted* input columns,
``r`` = qq_groupsize (second-level group, paper beta2) over output rows,
``G = ceil(n / g)`` column groups, ``R = ceil(m / r)`` row chunks. The last group / chunk may
be partial when the dimension is not a multiple of the group size.

Bit streams
-----------
Every code array is a *little-endian bit stream* stored in int32 words. Code ``k`` of a
stream with ``bits`` per code occupies stream bits ``[k*bits, (k+1)*bits)``; stream bit ``t``
is bit ``t % 32`` (LSB = 0) of word ``t // 32``. On little-endian machines this is the same
as "byte ``t // 8``, bit ``t % 8``", so a kernel may read any 64-bit window with an unaligned
load and shift. Each stream row is padded with zero bits to a whole word::

    words(k, bits) = ceil(k * bits / 32)

    stream bit:  31 ........ 6 5 4 3 2 1 0 | 63 ....... 33 32
                 [  c10|c9 ...  c1  |  c0 ] | [ ...  c10(hi) ]       (bits = 3)

Buffers of one layer (all flat tensors, no nested structures)
-------------------------------------------------------------
=================  =======  ====================  ==================================================
name               dtype    shape                 meaning
=================  =======  ====================  ==================================================
qweight            int32    [m, words(n, b)]      weight codes, row-major, columns in permuted order
scale_codes        int32    [G, words(m, sb)]     first-level scale of (row i, group j): code i of row j
zero_codes         int32    [G, words(m, zb)]     first-level zero point, same indexing
scale_meta         float16  [G, R, 2]             (step, zero) of the second-level quantizer of the
                                                  scales of rows [k*r, (k+1)*r) in group j.
                                                  Absent when sb == 16.
zero_meta          float16  [G, R, 2]             the same for the zero points. Absent when zb == 16.
perm               int16    [n]                   permuted column k reads input column perm[k]
                                                  (uint16 stored in int16: value & 0xFFFF)
outlier_row_ptr    int32    [m + 1]               CSR row pointers into the two arrays below
outlier_col        int16    [nnz]                 *permuted* column of each outlier (uint16 in int16)
outlier_delta      float16  [nnz]                 added to the dense value at that position
bias               any      [m]                   optional, not part of the packed format
=================  =======  ====================  ==================================================

Statistic bits ``sb``/``zb`` are 2..8 (bilevel: codes plus fp16 second-level meta) or 16
(raw: the code *is* the IEEE float16 bit pattern of the statistic, no meta).

Decoding (float32, in exactly this order of operations; ``affine(c, s, z) = (c - z) * s``)::

    scale[i, j] = affine(code, meta[j, i // r, 0], meta[j, i // r, 1])   (or raw fp16)
    zero[i, j]  = likewise with zero_codes / zero_meta
    W_perm[i, k] = affine(qweight code (i, k), scale[i, k // g], zero[i, k // g])
    W_perm[i, col] += float(delta)            for every outlier (i, col)
    W[:, perm[k]] = W_perm[:, k]

The quantizer reconstructs weights with these same operations (``affine`` below), so the
dequantized matrix is bit-identical to the one used for GPTQ error feedback.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1
WORD_BITS = 32
RAW_STAT_BITS = 16  # statistic stored as its float16 bit pattern, no second level
MIN_BITS, MAX_BITS = 2, 8
MAX_IN_FEATURES = 1 << 16  # column indices are uint16
META_STEP, META_ZERO = 0, 1  # order of the two float16 values in scale_meta / zero_meta


def words_for(count: int, bits: int) -> int:
    """Number of int32 words a stream row of ``count`` codes of ``bits`` bits occupies."""
    return (count * bits + WORD_BITS - 1) // WORD_BITS


def num_groups(size: int, group: int) -> int:
    """Number of (possibly partial) groups of ``group`` covering ``size``."""
    return (size + group - 1) // group


def affine(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * step`` in float32: the single dequantization formula of the format."""
    return (codes.to(torch.float32) - zero.to(torch.float32)) * step.to(torch.float32)


def to_uint16_storage(index: torch.Tensor) -> torch.Tensor:
    """Store indices in [0, 65536) as int16 bit patterns (torch has no general uint16)."""
    index = index.to(torch.int32)
    return torch.where(index >= 1 << 15, index - (1 << 16), index).to(torch.int16)


def from_uint16_storage(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_uint16_storage`, as int64 indices."""
    return stored.to(torch.int64) & 0xFFFF


def buffer_shapes(
    in_features: int,
    out_features: int,
    bits: int,
    groupsize: int,
    qq_groupsize: int,
    scale_bits: int,
    zero_bits: int,
    nnz: int,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every packed buffer (bias excluded) for one layer.

    ``groupsize`` / ``qq_groupsize`` are the effective sizes (a "whole row" group is ``n``).
    """
    m, n = out_features, in_features
    n_groups, n_chunks = num_groups(n, groupsize), num_groups(m, qq_groupsize)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "qweight": ((m, words_for(n, bits)), torch.int32),
        "scale_codes": ((n_groups, words_for(m, scale_bits)), torch.int32),
        "zero_codes": ((n_groups, words_for(m, zero_bits)), torch.int32),
        "perm": ((n,), torch.int16),
        "outlier_row_ptr": ((m + 1,), torch.int32),
        "outlier_col": ((nnz,), torch.int16),
        "outlier_delta": ((nnz,), torch.float16),
    }
    if scale_bits != RAW_STAT_BITS:
        shapes["scale_meta"] = ((n_groups, n_chunks, 2), torch.float16)
    if zero_bits != RAW_STAT_BITS:
        shapes["zero_meta"] = ((n_groups, n_chunks, 2), torch.float16)
    return shapes
