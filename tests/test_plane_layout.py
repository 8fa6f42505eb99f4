"""The CPU plane layout of the codes (csrc/include/spqr_hf/planes.h) and its kernels.

Oracle and tolerances as in test_cpu_kernels.py (float64 on the dequantised weight; bfloat16:
2**-8 * (|ref| + 2 * mag) + 1e-5 * mag; float16: 2**-11 * |ref| + 1e-5 * mag; float32: 1e-5 * mag).
The plane matvec's table lookups represent bfloat16 activations per 16-column group in 12-bit levels
(2^-12 of the group's largest |x|), float16 and float32 ones in two (2^-24), inside those bounds for the
inputs drawn here (one level would not be for float32: 2^-12 > 1e-5). Its dot-product kernel (the
avx512bf16 and avx512vnni paths, batches of 3-64) multiplies bfloat16 activations as they are (avx512bf16,
float32 sums) or int16 levels of them (2^-16 of the group's largest |x|; float16 and float32 in two
levels, 2^-31; int32 sums). A wrong plane bit, statistic or row order shifts outputs by O(mag).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from spqr_hf.format.pack import PackedSpQR
from spqr_hf.nn.linear import SpQRLinear
from spqr_hf.ops import _extension, cpu_layout
from test_cpu_kernels import assert_close_to_reference, random_packed, run_op

pytestmark = pytest.mark.skipif(
    not _extension.native_available(), reason=f"spqr_hf._C not built: {_extension.load_error()}"
)

PLANE_MAX_VECTORS = 24  # csrc/cpu/kernels.h kPlaneMaxVectors: larger batches dequantise tiles for a GEMM
PLANE_MAX_VECTORS_BF16_GEMM = 16  # kPlaneMaxVectorsBf16Gemm: the same for bfloat16 on CPUs with AVX512_BF16
# kPlaneDotMinVectors / kPlaneDotMaxVectors: the avx512vnni and avx512bf16 paths' dot-product kernel takes
# these batches (fewer: the table lookups, more: the prefill path)
PLANE_DOT_MIN, PLANE_DOT_MAX = 3, 64


def plane_batches(dtype: torch.dtype) -> list[int]:
    """Batches on both sides of every path boundary, for any instruction-set path."""
    lookup_max = PLANE_MAX_VECTORS_BF16_GEMM if dtype == torch.bfloat16 else PLANE_MAX_VECTORS
    return sorted({1, PLANE_DOT_MIN - 1, PLANE_DOT_MIN, lookup_max, lookup_max + 1, PLANE_DOT_MAX, PLANE_DOT_MAX + 1})


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_conversions_round_trip_bit_exact(bits):
    gen = torch.Generator().manual_seed(40 + bits)
    for m, n in [(1, 16), (31, 48), (32, 16), (33, 160), (100, 1024), (64, 272)]:
        packed = random_packed(gen, m, n, bits=bits, groupsize=16, qq_groupsize=min(16, m), stat_bits=3,
                               outlier_fraction=0.0)
        planes = cpu_layout.to_planes(packed.qweight, n, m, bits)
        assert planes.dtype == torch.uint8 and planes.numel() == (m + 31) // 32 * (n // 16) * bits * 64
        assert torch.equal(cpu_layout.to_rows(planes, n, m, bits), packed.qweight)
        geometry = cpu_layout.Geometry.of(packed)
        form = cpu_layout.buffers_to_planes(packed.tensors(), geometry)
        assert form["scale_meta"].shape == (packed.scale_meta.shape[1], n // 16, 2)  # chunk-major [R, G, 2]
        assert form["scale_meta"].dtype == torch.int16  # the float16 bits
        assert torch.equal(form["zero_meta"][-1, 0].view(torch.float16), packed.zero_meta[0, -1])
        # 3-bit statistics with qq_groupsize 16 take the block-major form; m = 1 (qq_groupsize 1) keeps the rows
        assert geometry.stat_blocks == (m >= 16)
        assert form["scale_codes"].dtype == (torch.uint8 if m >= 16 else torch.int32)
        back = cpu_layout.buffers_to_rows(form, geometry)
        assert all(torch.equal(back[name], packed.tensors()[name]) for name in cpu_layout.PLANE_BUFFERS)


def test_statistics_records_hold_each_blocks_bytes_of_each_group():
    """Record (block b, group j) of the block-major form is bytes 12 b .. 12 b + 11 of group j's 3-bit row
    stream (32 rows), zero past the stream's end, then 4 bytes of pad."""
    gen = torch.Generator().manual_seed(47)
    m, n = 70, 48  # 3 blocks, the last partial; 3 groups
    packed = random_packed(gen, m, n, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.0)
    form = cpu_layout.buffers_to_planes(packed.tensors(), cpu_layout.Geometry.of(packed))
    rows = packed.scale_codes.contiguous().view(torch.uint8)  # [3, 28]: 70 codes of 3 bits in 7 words
    blocks = form["scale_codes"]
    assert blocks.numel() == 3 * 3 * 12 + 4
    for b in range(3):
        for j in range(3):
            expected = torch.zeros(12, dtype=torch.uint8)
            stream = rows[j, 12 * b:12 * b + 12]
            expected[:stream.numel()] = stream
            assert torch.equal(blocks[(b * 3 + j) * 12:(b * 3 + j + 1) * 12], expected), (b, j)
    assert torch.equal(blocks[-4:], torch.zeros(4, dtype=torch.uint8))


def test_layout_holds_each_code_bit_where_the_header_says():
    """One code of value 2^p at (row 20, column 21): bit p of slot 24 (row 20), high nibble (quad 5 is
    the second quad of its pair), bit 1 (column 21 = 4 * 5 + 1), group 1, plane p."""
    from spqr_hf.format.pack import pack_bits

    for p in range(3):
        codes = torch.zeros(32, 32, dtype=torch.long)
        codes[20, 21] = 1 << p
        planes = cpu_layout.to_planes(pack_bits(codes, 3), 32, 32, 3).view(2, 3, 2, 32)  # [G][plane][half][slot]
        expected = torch.zeros_like(planes)
        expected[1, p, 0, 24] = 1 << (4 + 1)
        assert torch.equal(planes, expected)


def test_conversions_refuse_other_geometries_and_bad_buffers():
    gen = torch.Generator().manual_seed(45)
    packed = random_packed(gen, 20, 48, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.0)
    assert not cpu_layout.layer_fits(48, 16, 5) and not cpu_layout.layer_fits(40, 16, 3)
    assert not cpu_layout.layer_fits(48, 32, 3) and cpu_layout.layer_fits(48, 16, 3)
    with pytest.raises(RuntimeError, match="plane layout needs"):
        cpu_layout.to_planes(packed.qweight, 48, 20, 5)
    with pytest.raises(RuntimeError, match="qweight"):
        cpu_layout.to_planes(packed.qweight[:-1], 48, 20, 3)
    planes = cpu_layout.to_planes(packed.qweight, 48, 20, 3)
    with pytest.raises(RuntimeError, match="qweight"):
        cpu_layout.to_rows(planes[:-1], 48, 20, 3)
    with pytest.raises(RuntimeError, match="qweight"):
        run_op(torch.randn(1, 48), dataclasses.replace(cpu_layout.packed_to_planes(packed), qweight=planes[:-1]))
    with pytest.raises(RuntimeError, match="plane layout needs"):  # planes claimed for a 5-bit layer
        run_op(torch.randn(1, 48), dataclasses.replace(packed, bits=5, qweight=planes))
    with pytest.raises(RuntimeError, match="scale_meta"):  # planes with group-major second-level parameters
        run_op(torch.randn(1, 48), dataclasses.replace(packed, qweight=planes))
    form = cpu_layout.packed_to_planes(packed)
    with pytest.raises(RuntimeError, match="zero_codes"):  # truncated block-major statistics
        run_op(torch.randn(1, 48), dataclasses.replace(form, zero_codes=form.zero_codes[:-1]))
    with pytest.raises(RuntimeError, match="block-major statistics form"):  # ... with the row streams' codes
        run_op(torch.randn(1, 48), dataclasses.replace(packed, scale_codes=form.scale_codes))
    with pytest.raises(RuntimeError, match="block-major statistics form"):  # ... for chunks of 8 rows
        run_op(torch.randn(1, 48), dataclasses.replace(form, qq_groupsize=8))
    with pytest.raises(RuntimeError, match="stat_bits"):
        torch.ops.spqr_hf.stat_blocks_from_rows(packed.scale_codes, 20, 5)
    with pytest.raises(RuntimeError, match="codes"):
        torch.ops.spqr_hf.stat_rows_from_blocks(form.scale_codes[:-1], 3, 20, 3)
    # As many chunks as groups (48 rows in chunks of 16, 48 columns): the shapes agree, the dtype tells.
    square = random_packed(gen, 48, 48, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.0)
    assert square.scale_meta.shape == (3, 3, 2)
    square_planes = cpu_layout.to_planes(square.qweight, 48, 48, 3)
    with pytest.raises(RuntimeError, match="scale_meta"):
        run_op(torch.randn(1, 48), dataclasses.replace(square, qweight=square_planes))
    x = torch.randn(2, 48)
    assert_close_to_reference(run_op(x, cpu_layout.packed_to_planes(square)), x, square, None)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_plane_kernels_match_float64_reference(isa, bits):
    """Batches 1-24 take the table-lookup matvec (one level for bfloat16, two for float16 and float32;
    bfloat16 only 1-16 where the CPU multiplies it natively), larger ones the transposed tiles (bfloat16
    ones there) and a GEMM; on the avx512vnni and avx512bf16 paths the dot-product kernel takes batches
    of 3-64; CPUs without the plane kernels the row streams converted back: heights that
    end mid-block, widths of odd group counts, second-level chunks of 8-64 rows or not multiples of 16
    (the generic statistics decoder), raw and 2-8 bit statistics (2-4 bits with chunks of multiples of 16
    rows block-major, decoded inline: the last block's words reach into the pad, a half past m takes the
    last chunk), rows with 0 to many outliers, bias."""
    gen = torch.Generator().manual_seed(50 + bits)
    cases = [(32, 16, 3, 16), (70, 48, 3, 16), (33, 64, 4, 32), (40, 160, 16, 16), (96, 80, 2, 8), (64, 272, 3, 64),
             (50, 32, 3, 50), (200, 1024, 3, 16), (45, 48, 8, 12), (130, 96, 4, 48), (64, 96, 2, 16)]
    for m, n, stat_bits, qq_groupsize in cases:
        packed = random_packed(gen, m, n, bits=bits, groupsize=16, qq_groupsize=min(qq_groupsize, m),
                               stat_bits=stat_bits, outlier_fraction=0.03)
        planes = cpu_layout.packed_to_planes(packed)
        bias = torch.randn(m, generator=gen)
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for batch in plane_batches(dtype):
                x = torch.randn(batch, n, generator=gen).to(dtype)
                assert_close_to_reference(run_op(x, planes, bias), x, packed, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_plane_matvec_activation_range_and_non_finite(dtype):
    """A group with one large value, a group of zeros, a group too small for its reciprocal (the call
    then runs on the row streams, whose float loop keeps it; float16 has no such values), and NaN / inf
    staying non-finite; one vector and a batch for the dot-product kernel (its other vectors ordinary)."""
    gen = torch.Generator().manual_seed(60)
    packed = random_packed(gen, 48, 256, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.01)
    planes = cpu_layout.packed_to_planes(packed)
    perm = packed.perm.long() & 0xFFFF
    batch = PLANE_DOT_MIN + 1
    for rows in (2, batch):
        x = torch.randn(rows, 256, generator=gen)
        x[0, perm[0::16]] *= 100.0
        x[:, perm[32:48]] = 0.0
        xd = x.to(dtype)
        assert_close_to_reference(run_op(xd, planes), xd, packed, None)
    for rows in (1, batch):
        if dtype != torch.float16:
            tiny = torch.randn(rows, 256, generator=gen).to(dtype)
            tiny[0] = tiny[0] * 1e-33
            assert_close_to_reference(run_op(tiny, planes), tiny, packed, None)
        for bad in (float("nan"), float("inf")):
            xn = torch.randn(rows, 256, generator=gen).to(dtype)
            xn[0, 7] = bad
            assert not torch.isfinite(run_op(xn, planes)[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plane_prefill_keeps_non_finite_statistics(dtype):
    """A float16 NaN with the widest payload as a second-level step (a corrupted checkpoint): the rows it
    scales come out non-finite in the plane layout's prefill as in the row streams' (a bfloat16 rounding
    without the NaN case would carry it into the sign bit: -0), the other rows finite."""
    gen = torch.Generator().manual_seed(62)
    packed = random_packed(gen, 64, 96, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.05)
    meta = packed.scale_meta.clone()
    meta.view(torch.int16)[1, 0, 0] = 0x7FFF  # group 1, chunk 0 (rows 0-15): step NaN
    bad = dataclasses.replace(packed, scale_meta=meta)
    x = torch.randn(PLANE_MAX_VECTORS + 8, 96, generator=gen).to(dtype)
    rows, planes = run_op(x, bad), run_op(x, cpu_layout.packed_to_planes(bad))
    assert not torch.isfinite(rows[:, :16]).any() and torch.isfinite(rows[:, 16:]).all()
    assert torch.equal(torch.isfinite(planes), torch.isfinite(rows))


def test_plane_kernels_bad_outlier_column_raises():
    gen = torch.Generator().manual_seed(61)
    packed = random_packed(gen, 40, 64, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.2)
    col = packed.outlier_col.clone()
    col[len(col) // 2] = 64
    bad = cpu_layout.packed_to_planes(dataclasses.replace(packed, outlier_col=col))
    for batch in (1, 6, PLANE_MAX_VECTORS + 1, PLANE_DOT_MAX + 1):
        with pytest.raises(RuntimeError, match="outlier_col"):
            run_op(torch.randn(batch, 64).to(torch.bfloat16), bad)


def test_plane_kernels_write_scratch_before_reading_it():
    env = {**os.environ, "SPQR_HF_POISON_SCRATCH": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "plane_kernels_match or activation_range or bad_outlier"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


# --- SpQRLinear: the layout in memory, the row streams everywhere else ---------------------------------

needs_plane_kernels = pytest.mark.skipif(
    not cpu_layout.kernels_available(), reason="this CPU's kernels have no plane-layout kernels (AVX2 needed)"
)


def _module(seed: int = 70) -> tuple[SpQRLinear, PackedSpQR, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    packed = random_packed(gen, 72, 96, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.02)
    bias = torch.randn(72, generator=gen)
    original = packed.qweight.clone()
    return SpQRLinear.from_packed(packed, bias), packed, original


@needs_plane_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_module_takes_planes_on_its_first_call_and_saves_row_streams(dtype):
    module, packed, original = _module()
    x = torch.randn(3, 96).to(dtype)
    before = module.state_dict()
    y = module(x)
    assert module.qweight.dtype == torch.uint8  # the plane layout, same bytes (72 rows padded to 96)
    assert module.scale_meta.shape == (72 // 16 + 1, 96 // 16, 2)  # chunk-major second-level parameters
    assert module.scale_meta.dtype == torch.int16
    assert_close_to_reference(y, x, dataclasses.replace(packed, qweight=original), module.bias)
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # checkpoints see the row streams
    assert torch.equal(module.packed.qweight, original) and torch.equal(module.packed.zero_meta, packed.zero_meta)
    assert torch.equal(module.dequantize(), SpQRLinear.from_packed(dataclasses.replace(packed, qweight=original),
                                                                     module.bias).dequantize())
    assert torch.equal(module(x), y)  # deterministic on the planes


@needs_plane_kernels
def test_module_keeps_planes_across_dtypes_and_restores_row_streams_on_moves_and_loads():
    module, packed, original = _module(71)
    xb = torch.randn(2, 96).to(torch.bfloat16)
    yb = module(xb)
    for dtype in (torch.float32, torch.float16):  # other dtypes run on the planes too
        x = xb.to(dtype)
        y = module(x)
        assert module.qweight.dtype == torch.uint8
        assert_close_to_reference(y, x, dataclasses.replace(packed, qweight=original), module.bias)
    assert torch.equal(module(xb), yb)
    module.to(torch.float32)  # .to() restores the row streams (dtypes of packed buffers kept)
    assert module.qweight.dtype == torch.int32 and torch.equal(module.qweight, original)
    assert torch.equal(module.scale_meta, packed.scale_meta) and torch.equal(module.zero_meta, packed.zero_meta)
    module(xb)
    state = {k: v.clone() for k, v in _module(72)[0].state_dict().items()}
    module.load_state_dict(state)  # loading into a module holding planes
    assert module.qweight.dtype == torch.int32 and torch.equal(module.qweight, state["qweight"])
    fresh = _module(72)[0]
    assert torch.equal(module(xb), fresh(xb))


@needs_plane_kernels
def test_module_keeps_row_streams_where_planes_do_not_apply(monkeypatch):
    gen = torch.Generator().manual_seed(73)
    for bits, n in [(5, 96), (3, 40)]:  # 5-bit codes; a width that is not a multiple of 16
        packed = random_packed(gen, 40, n, bits=bits, groupsize=16, qq_groupsize=16, stat_bits=3,
                               outlier_fraction=0.0)
        module = SpQRLinear.from_packed(packed)
        module(torch.randn(1, n).to(torch.bfloat16))
        assert module.qweight.dtype == torch.int32
    for variable, value in [("SPQR_HF_CPU_LAYOUT", "rows"), ("SPQR_HF_BACKEND", "torch")]:
        monkeypatch.setenv(variable, value)
        module = _module(74)[0]
        module(torch.randn(1, 96).to(torch.bfloat16))
        assert module.qweight.dtype == torch.int32
        monkeypatch.delenv(variable)


@needs_plane_kernels
def test_module_on_planes_survives_a_forced_isa_without_them(monkeypatch):
    module, packed, original = _module(75)
    x = torch.randn(4, 96).to(torch.bfloat16)
    y = module(x)
    assert module.qweight.dtype == torch.uint8
    for name in _extension.supported_isas():
        monkeypatch.setenv("SPQR_HF_CPU_ISA", name)
        assert_close_to_reference(module(x), x, dataclasses.replace(packed, qweight=original), module.bias)
    monkeypatch.delenv("SPQR_HF_CPU_ISA")
    assert torch.equal(module(x), y)


def test_plane_kernels_do_not_depend_on_thread_count():
    """The plane matvec computes each 32-row block on one thread in a fixed order: bit-identical for any
    thread count (larger batches end in torch's GEMM, whose own blocking may depend on it)."""
    gen = torch.Generator().manual_seed(76)
    packed = random_packed(gen, 200, 256, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.02)
    planes = cpu_layout.packed_to_planes(packed)
    threads = torch.get_num_threads()
    try:
        for batch, dtype in [(1, torch.bfloat16), (5, torch.bfloat16), (PLANE_MAX_VECTORS_BF16_GEMM, torch.bfloat16),
                             (40, torch.bfloat16), (1, torch.float32), (7, torch.float16), (9, torch.float32)]:
            x = torch.randn(batch, 256, generator=gen).to(dtype)
            outs = []
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                outs.append(run_op(x, planes))
            assert all(torch.equal(outs[0], out) for out in outs[1:])
    finally:
        torch.set_num_threads(threads)
