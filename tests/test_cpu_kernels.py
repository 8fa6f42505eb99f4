"""Native CPU kernels (spqr_hf._C) against the float64 reference, on every instruction-set path.

Oracle: ``x.double() @ dequantize(packed).double().T + bias``. Tolerances are worst-case bounds
per output element, with ``mag = |x| @ |W|.T + |bias|`` (the sum of absolute products):
  float32   : 1e-5 * mag                                  (float32 accumulation over <= 300 terms)
  float16   : 2**-11 * |ref| + 1e-5 * mag                 (plus rounding the output to float16)
  bfloat16  : 2**-8 * (|ref| + 2 * mag) + 1e-5 * mag      (output rounding; batched prefill also
                                                           rounds decoded weights to bfloat16)
The integer matvecs (groups of 16; 1-4 vectors, on avx2 up to 16) represent x per 16-column group
relative to the group's largest |x|: avx512bf16 / amx in int8 levels to 2^-15 (bfloat16) or 2^-22
(float16 / float32), avx2 in int16 levels to 2^-16 or 2^-31; inside these bounds for the inputs drawn here.
A wrong code, statistic, permutation or outlier shifts the output by O(mag), far above these.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ALL_ISAS
from spqr_hf.format import layout
from spqr_hf.format.pack import PackedSpQR, dequantize, pack_bits
from spqr_hf.nn.linear import SpQRLinear
from spqr_hf.ops import _extension, _schema

pytestmark = pytest.mark.skipif(
    not _extension.native_available(), reason=f"spqr_hf._C not built: {_extension.load_error()}"
)

MATVEC_MAX_BATCH = 8  # csrc/cpu/kernels.h: larger batches take the dequantise + GEMM path (with "amx",
# bfloat16 batches of 5 to 64 take its tile-unit GEMM; with "avx2", bfloat16 batches up to 16 in groups of
# 16 its integer matvec: the sweeps below run batches 5, 9 and 64)


def random_packed(
    gen: torch.Generator, m: int, n: int, *, bits: int, groupsize: int, qq_groupsize: int, stat_bits: int,
    outlier_fraction: float,
) -> PackedSpQR:
    """A valid random layer: random codes, positive scales, zero points inside the code range."""
    n_groups, n_chunks = layout.num_groups(n, groupsize), layout.num_groups(m, qq_groupsize)

    def stats(low: float, high: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if stat_bits == layout.RAW_STAT_BITS:
            values = (low + (high - low) * torch.rand(n_groups, m, generator=gen)).to(torch.float16)
            return pack_bits(layout.from_uint16_storage(values.view(torch.int16)), 16), None
        codes = torch.randint(0, 1 << stat_bits, (n_groups, m), generator=gen)
        step = (high - low) / ((1 << stat_bits) - 1) * (0.5 + torch.rand(n_groups, n_chunks, generator=gen))
        zero = -low / step + torch.rand(n_groups, n_chunks, generator=gen)
        return pack_bits(codes, stat_bits), torch.stack([step, zero], -1).to(torch.float16)

    scale_codes, scale_meta = stats(0.01, 0.1)
    zero_codes, zero_meta = stats(0.0, float((1 << bits) - 1))
    nnz = int(round(outlier_fraction * m * n))
    flat = torch.randperm(m * n, generator=gen)[:nnz].sort().values
    row_ptr = torch.zeros(m + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(flat // n, minlength=m).cumsum(0)
    packed = PackedSpQR(
        in_features=n, out_features=m, bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
        scale_bits=stat_bits, zero_bits=stat_bits,
        qweight=pack_bits(torch.randint(0, 1 << bits, (m, n), generator=gen), bits),
        scale_codes=scale_codes, zero_codes=zero_codes, scale_meta=scale_meta, zero_meta=zero_meta,
        perm=layout.to_uint16_storage(torch.randperm(n, generator=gen)),
        outlier_row_ptr=row_ptr.to(torch.int32), outlier_col=layout.to_uint16_storage(flat % n),
        outlier_delta=torch.randn(nnz, generator=gen).to(torch.float16),
    )
    packed.validate()
    return packed


def run_op(x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.spqr_hf.spqr_linear(x, *_schema.op_args(packed, bias))


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None) -> None:
    weight = dequantize(packed).double()
    b = torch.zeros(packed.out_features, dtype=torch.float64) if bias is None else bias.double()
    ref = x.double() @ weight.T + b
    mag = x.double().abs() @ weight.abs().T + b.abs()
    if x.dtype == torch.float32:
        tol = 1e-5 * mag
    elif x.dtype == torch.float16:
        tol = 2.0**-11 * ref.abs() + 1e-5 * mag
    else:
        tol = 2.0**-8 * (ref.abs() + 2 * mag) + 1e-5 * mag
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], packed.out_features)
    err = (y.double() - ref).abs()
    worst = int((err - tol).flatten().argmax())
    assert bool((err <= tol).all()), (
        f"max error {err.flatten()[worst]:.3g} > tolerance {tol.flatten()[worst]:.3g} (ref {ref.flatten()[worst]:.3g})"
    )


def test_auto_selects_best_supported_isa(monkeypatch):
    monkeypatch.delenv("SPQR_HF_CPU_ISA", raising=False)
    supported = _extension.supported_isas()
    assert supported[-1] == "scalar" and _extension.cpu_isa() == supported[0]


@pytest.mark.parametrize("case", range(24))
def test_matches_float64_reference(isa, case):
    """Seeded sweep: odd shapes, bits 2..8, group sizes, raw/quantized stats, 0..5% outliers, batch 1..64."""
    gen = torch.Generator().manual_seed(1000 + case)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    m, n = int(torch.randint(1, 70, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen))
    bits = 2 + case % 7
    groupsize = min(pick([4, 8, 16, 32, 64, n]), n)
    qq_groupsize = min(pick([4, 16, 32, m]), m)
    stat_bits = pick([2, 3, 4, 8, 16])
    packed = random_packed(gen, m, n, bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
                           stat_bits=stat_bits, outlier_fraction=pick([0.0, 0.01, 0.05]))
    bias = torch.randn(m, generator=gen) if case % 2 else None
    for batch in (1, 2, 5, MATVEC_MAX_BATCH + 1, 64):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(batch, n, generator=gen).to(dtype)
            assert_close_to_reference(run_op(x, packed, bias), x, packed, bias)


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_llama_like_layer(isa, batch):
    """A realistic setting: 3-bit weights, groups of 16, 3-bit stats over 16 rows, 1% outliers."""
    gen = torch.Generator().manual_seed(7)
    packed = random_packed(gen, 96, 512, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.01)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, batch, 512, generator=gen).to(dtype)
        assert_close_to_reference(run_op(x, packed), x, packed, None)


@pytest.mark.parametrize("qq_groupsize", [16, 32])
def test_many_second_level_chunks(isa, qq_groupsize):
    """Tall layers span several blocks of second-level chunks (the avx512bf16 path decodes 16 at a time)."""
    gen = torch.Generator().manual_seed(8)
    packed = random_packed(gen, 600, 160, bits=3, groupsize=16, qq_groupsize=qq_groupsize, stat_bits=3,
                           outlier_fraction=0.01)
    for batch in (1, 3):
        x = torch.randn(batch, 160, generator=gen)
        assert_close_to_reference(run_op(x, packed), x, packed, None)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_integer_matvec_path(isa, bits):
    """Batches 1-4 in groups of 16 take an integer matvec: on avx512bf16 / amx for codes of <= 4 bits
    (64-column windows of four groups, superblocks of 4 tiles), on avx2 for 2-8 bits and up to 16
    vectors (one group per register, vectors two at a time; statistics of <= 4 bits in one chunk decoded
    inline, others generically): widths that end mid-window, mid-group or mid-word, heights that end
    mid-tile or mid-superblock, tall layers, rows with more and fewer than 8 outliers, odd batches."""
    gen = torch.Generator().manual_seed(20 + bits)
    for m, n, stat_bits, qq_groupsize in [(1, 16, 3, 16), (17, 40, 2, 4), (33, 64, 4, 32), (40, 100, 16, 16),
                                          (70, 257, 3, 16), (20, 1000, 3, 64), (200, 48, 3, 16), (24, 64, 6, 16)]:
        packed = random_packed(gen, m, n, bits=bits, groupsize=16, qq_groupsize=min(qq_groupsize, m),
                               stat_bits=stat_bits, outlier_fraction=0.02)
        for batch in (1, 2, 3, 4, 7, 16):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(batch, n, generator=gen).to(dtype)
                assert_close_to_reference(run_op(x, packed), x, packed, None)


def test_integer_matvec_activation_range(isa):
    """The integer paths represent each vector's 16-column groups relative to their largest |x|: a group
    with one large value, groups of zeros, and groups too small for that (< 1e-30, left to the float
    loops) stay accurate."""
    gen = torch.Generator().manual_seed(30)
    n = 256
    packed = random_packed(gen, 48, n, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.01)
    perm = layout.from_uint16_storage(packed.perm).long()  # kernel groups are runs of 16 permuted columns
    x = torch.randn(2, n, generator=gen)
    x[0, perm[0::16]] *= 1000.0  # one large value per group
    x[:, perm[32:48]] = 0.0  # a group of zeros
    x[1, perm[64:80]] *= 1e-6  # another vector's range
    for rows in (x[:1], x):
        for dtype in (torch.float32, torch.float16):
            xd = rows.to(dtype)
            assert_close_to_reference(run_op(xd, packed), xd, packed, None)
    tiny = torch.randn(2, n, generator=gen) * 1e-33
    assert_close_to_reference(run_op(tiny, packed), tiny, packed, None)


def test_non_finite_activations_stay_non_finite(isa):
    """An inf or NaN in x must not be quantised into finite garbage (the integer paths hand such calls to
    the float loops): the rows the float64 reference makes non-finite are non-finite."""
    gen = torch.Generator().manual_seed(31)
    packed = random_packed(gen, 32, 128, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.01)
    weight = dequantize(packed).double()
    for bad in (float("inf"), float("nan")):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 128, generator=gen)
            x[0, 77] = bad  # the other vector stays finite, and so must its outputs
            x = x.to(dtype)
            ref = x.double() @ weight.T
            assert torch.equal(torch.isfinite(run_op(x, packed)), torch.isfinite(ref))


def test_outlier_columns_in_any_order(isa):
    """The packer writes each row's outlier columns increasing and the fast dequantiser relies on it;
    a row in another order (the operator takes raw buffers) must take the general path, not be wrong."""
    gen = torch.Generator().manual_seed(9)
    packed = random_packed(gen, 48, 200, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.05)
    cols = layout.from_uint16_storage(packed.outlier_col).clone()
    row_ptr = packed.outlier_row_ptr.tolist()
    for row in range(0, packed.out_features, 2):  # every other row reversed
        cols[row_ptr[row]:row_ptr[row + 1]] = cols[row_ptr[row]:row_ptr[row + 1]].flip(0)
    assert any(row_ptr[r + 1] - row_ptr[r] > 1 for r in range(0, packed.out_features, 2))
    packed.outlier_col = layout.to_uint16_storage(cols)
    for batch in (1, MATVEC_MAX_BATCH + 1, 40):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, 200, generator=gen).to(dtype)
            assert_close_to_reference(run_op(x, packed), x, packed, None)


def test_kernels_write_scratch_before_reading_it():
    """Per-thread scratch is reused between calls, never cleared: with SPQR_HF_POISON_SCRATCH=1 it is
    filled with NaN before every call, and the reference comparisons of every path must still pass."""
    env = {**os.environ, "SPQR_HF_POISON_SCRATCH": "1"}
    selection = ("matches_float64_reference or llama_like_layer or many_second_level_chunks or any_order or "
                 "integer_matvec")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_leading_shapes_noncontiguous_input_and_bias_dtypes():
    gen = torch.Generator().manual_seed(3)
    packed = random_packed(gen, 40, 48, bits=4, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.02)
    x = torch.randn(48, 2, 3, generator=gen).permute(1, 2, 0)  # [2, 3, 48], not contiguous
    for bias in (None, torch.randn(40, generator=gen), torch.randn(40, generator=gen).to(torch.bfloat16)):
        assert_close_to_reference(run_op(x, packed, bias), x, packed, bias)
    assert run_op(torch.randn(0, 48), packed).shape == (0, 40)
    vector = torch.randn(48, generator=gen)
    assert_close_to_reference(run_op(vector, packed), vector, packed, None)


def test_module_forward_uses_kernel_and_matches_reference():
    gen = torch.Generator().manual_seed(5)
    packed = random_packed(gen, 64, 80, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.01)
    bias = torch.randn(64, generator=gen)
    module = SpQRLinear.from_packed(packed, bias)
    for batch in (1, 17):
        x = torch.randn(batch, 80, generator=gen)
        y = module(x)
        # The module's forward is the native op on its buffers (in the CPU plane form, where it took it).
        op_args = _schema.buffer_args(module._buffers, module.geometry)
        assert torch.equal(y, torch.ops.spqr_hf.spqr_linear(x, *op_args))
        assert_close_to_reference(y, x, packed, bias)


def test_results_do_not_depend_on_thread_count():
    """Each output row is computed by one thread in a fixed order: bit-identical for any thread count."""
    gen = torch.Generator().manual_seed(11)
    packed = random_packed(gen, 200, 256, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.01)
    x = torch.randn(3, 256, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_op(x, packed)
        torch.set_num_threads(max(2, threads))
        multi = run_op(x, packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (12, torch.bfloat16)])
def test_opcheck(batch, dtype):
    gen = torch.Generator().manual_seed(13)
    packed = random_packed(gen, 24, 40, bits=3, groupsize=8, qq_groupsize=16, stat_bits=3, outlier_fraction=0.05)
    x = torch.randn(batch, 40, generator=gen).to(dtype)
    torch.library.opcheck(torch.ops.spqr_hf.spqr_linear.default, (x, *_schema.op_args(packed, torch.randn(24))))


# ---------------------------------------------------------------- bad input: exceptions, never crashes

def _small_layer() -> PackedSpQR:
    return random_packed(torch.Generator().manual_seed(17), 20, 36, bits=3, groupsize=16, qq_groupsize=8,
                         stat_bits=3, outlier_fraction=0.05)


def _corruptions(packed: PackedSpQR):
    """(description, packed copy) pairs that a corrupted checkpoint could produce."""
    def replaced(**changes) -> PackedSpQR:
        fields = {**packed.__dict__, **changes}
        return PackedSpQR(**fields)

    tensors = packed.tensors()
    for name, t in tensors.items():
        yield f"{name} truncated", replaced(**{name: t.flatten()[:-1].reshape(-1) if t.dim() == 1 else t[:-1]})
        yield f"{name} wrong dtype", replaced(**{name: t.to(torch.float64)})
        if t.dim() > 1:
            yield f"{name} short rows", replaced(**{name: t[..., :-1].contiguous()})
    row_ptr = packed.outlier_row_ptr.clone()
    row_ptr[5] = int(row_ptr[6]) + 1  # row 5 would end before it starts
    yield "row_ptr decreasing", replaced(outlier_row_ptr=row_ptr)
    yield "row_ptr past nnz", replaced(outlier_row_ptr=packed.outlier_row_ptr + 1)
    col = packed.outlier_col.clone()
    col[-1] = packed.in_features
    yield "outlier column out of range", replaced(outlier_col=col)
    col[-1] = -1  # 65535 as uint16
    yield "outlier column 65535", replaced(outlier_col=col)
    perm = packed.perm.clone()
    perm[0] = packed.in_features + 3
    yield "perm out of range", replaced(perm=perm)
    yield "scale_meta missing", replaced(scale_meta=None)
    for field, value in [("bits", 9), ("bits", 1), ("groupsize", 0), ("qq_groupsize", -1), ("scale_bits", 12),
                         ("in_features", 37), ("out_features", 21), ("in_features", 70000)]:
        yield f"{field}={value}", replaced(**{field: value})


def test_corrupted_buffers_raise(isa):
    packed = _small_layer()
    for batch in (1, 16):
        x = torch.randn(batch, packed.in_features)
        for description, bad in _corruptions(packed):
            with pytest.raises(RuntimeError):
                run_op(x if bad.in_features == packed.in_features else torch.randn(batch, bad.in_features), bad)
                pytest.fail(f"no error for {description}")


def test_outlier_column_out_of_range_anywhere_in_a_row(isa):
    """Outliers are added 8 at a time on some paths (a gather of x) and one at a time at a row's end:
    a bad column at any position of a row with many outliers raises instead of reading past x."""
    gen = torch.Generator().manual_seed(18)
    packed = random_packed(gen, 16, 64, bits=3, groupsize=16, qq_groupsize=16, stat_bits=3, outlier_fraction=0.3)
    row_ptr = packed.outlier_row_ptr.tolist()
    first, count = row_ptr[3], row_ptr[4] - row_ptr[3]
    assert count >= 17
    x = torch.randn(1, 64, generator=gen)
    for position in (0, 7, 8, count - 1):
        for bad_column in (64, -1):  # -1: 65535 as uint16
            col = packed.outlier_col.clone()
            col[first + position] = bad_column
            with pytest.raises(RuntimeError, match="outlier_col"):
                run_op(x, PackedSpQR(**{**packed.__dict__, "outlier_col": col}))


def test_bad_activations_raise():
    packed = _small_layer()
    with pytest.raises(RuntimeError, match="features|shape"):
        run_op(torch.randn(2, packed.in_features + 1), packed)
    with pytest.raises(RuntimeError, match="dtype"):
        run_op(torch.randn(2, packed.in_features).double(), packed)
    with pytest.raises(RuntimeError, match="bias"):
        run_op(torch.randn(2, packed.in_features), packed, torch.randn(packed.out_features + 1))


def test_random_buffers_fuzz(isa):
    """Random geometry and random buffer contents/sizes: an exception or a result, never a crash."""
    gen = torch.Generator().manual_seed(19)
    rand = lambda low, high: int(torch.randint(low, high, (1,), generator=gen))  # noqa: E731
    raised = 0
    for _ in range(150):
        m, n, bits = rand(1, 40), rand(1, 70), rand(2, 9)
        stat_bits = [2, 3, 8, 16][rand(0, 4)]
        g, r = rand(1, 80), rand(1, 50)
        shapes = layout.buffer_shapes(n, m, bits, g, r, stat_bits, stat_bits, rand(0, 30))
        buffers = {}
        for name, (shape, dtype) in shapes.items():
            if rand(0, 4) == 0:  # truncate or extend one dimension
                shape = tuple(max(0, s + rand(-2, 3)) if i == rand(0, len(shape)) else s for i, s in enumerate(shape))
            info = torch.iinfo(dtype) if not dtype.is_floating_point else None
            if info is not None:
                buffers[name] = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)
            else:
                buffers[name] = torch.randn(shape, generator=gen).to(dtype)
        if rand(0, 2):  # a plausible CSR pointer half of the time, so kernels run on random codes
            nnz = buffers["outlier_col"].numel()
            ptr = torch.randint(0, nnz + 1, (m + 1,), generator=gen).sort().values
            ptr[0], ptr[-1] = 0, nnz
            buffers["outlier_row_ptr"] = ptr.to(torch.int32)
            buffers["outlier_col"] = torch.randint(0, n + rand(0, 2), (nnz,), generator=gen).to(torch.int16)
            buffers["perm"] = torch.randperm(n, generator=gen).to(torch.int16)
        packed = PackedSpQR(in_features=n, out_features=m, bits=bits, groupsize=g, qq_groupsize=r,
                            scale_bits=stat_bits, zero_bits=stat_bits, scale_meta=buffers.pop("scale_meta", None),
                            zero_meta=buffers.pop("zero_meta", None), **buffers)
        try:
            y = run_op(torch.randn(rand(1, 12), n, generator=gen), packed)
            assert y.shape[-1] == m
        except RuntimeError:
            raised += 1
    assert 0 < raised < 150  # both outcomes were exercised


def test_unknown_or_unsupported_isa_raises(monkeypatch):
    packed = _small_layer()
    monkeypatch.setenv("SPQR_HF_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="SPQR_HF_CPU_ISA"):
        run_op(torch.randn(1, packed.in_features), packed)
    unsupported = [name for name in ALL_ISAS if name not in _extension.supported_isas()]
    if unsupported:
        monkeypatch.setenv("SPQR_HF_CPU_ISA", unsupported[0])
        with pytest.raises(RuntimeError, match="does not support"):
            run_op(torch.randn(1, packed.in_features), packed)


def test_missing_extension_falls_back_with_one_warning():
    """Without spqr_hf._C the package imports, warns once, records why, and the op still works."""
    code = (
        "import sys, warnings\n"
        "sys.modules['spqr_hf._C'] = None\n"  # makes `import spqr_hf._C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, spqr_hf.ops\n"
        "    from spqr_hf.ops import _extension\n"
        "    _extension.load(); _extension.load()\n"
        "native = [w for w in caught if 'native CPU kernels' in str(w.message)]\n"
        "assert len(native) == 1, caught\n"
        "assert not _extension.native_available() and 'spqr_hf._C' in _extension.load_error()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPQR_HF_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
