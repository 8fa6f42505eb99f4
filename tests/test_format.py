"""The packed format: bit streams, validation, exact decoding, stored size, module round trips."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch

from spqr_hf.core import SpQRParams, spqr_quantize
from spqr_hf.format import layout
from spqr_hf.format.pack import dequantize, pack_bits, unpack_bits
from spqr_hf.nn import SpQRLinear
from spqr_hf.ops import _extension, _schema, dispatch

from synthetic import correlated_inputs, heavy_tailed_weight, hessian_of, random_packed


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_pack_unpack_round_trip_and_bit_order(gen, bits):
    for rows, count in [(1, 1), (3, 31), (2, 32), (5, 33), (4, 100), (1, 577), (3, 0)]:
        codes = torch.randint(0, 1 << bits, (rows, count), generator=gen)
        words = pack_bits(codes, bits)
        assert words.dtype == torch.int32 and words.shape == (rows, layout.words_for(count, bits))
        assert words.is_contiguous(), "the CPU op would copy a strided stream on every call"
        assert torch.equal(unpack_bits(words, count, bits), codes)
        for r in range(rows):  # independent reference: one big little-endian integer per row
            stream = sum(int(c) << (bits * k) for k, c in enumerate(codes[r].tolist()))
            packed = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words[r].tolist()))
            assert packed == stream


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([[0, 8]]), 3)


def _scalar_decode(packed) -> torch.Tensor:
    """Element-by-element float64 decoding straight from the layout docstring (an independent oracle)."""
    m, n = packed.out_features, packed.in_features

    def code(words: torch.Tensor, row: int, index: int, bits: int) -> int:
        stream = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words[row].tolist()))
        return (stream >> (index * bits)) & ((1 << bits) - 1)

    def stat(codes, meta, bits, group, row) -> float:
        c = code(codes, group, row, bits)
        if bits == 16:
            return float(torch.tensor([c - (1 << 16) if c >= 1 << 15 else c], dtype=torch.int16).view(torch.float16))
        step, zero = (float(v) for v in meta[group, row // packed.qq_groupsize])
        return (c - zero) * step

    perm = [int(p) & 0xFFFF for p in packed.perm.tolist()]
    out = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        for k in range(n):
            g = k // packed.groupsize
            s = stat(packed.scale_codes, packed.scale_meta, packed.scale_bits, g, i)
            z = stat(packed.zero_codes, packed.zero_meta, packed.zero_bits, g, i)
            out[i, perm[k]] = (code(packed.qweight, i, k, packed.bits) - z) * s
        for idx in range(int(packed.outlier_row_ptr[i]), int(packed.outlier_row_ptr[i + 1])):
            out[i, perm[int(packed.outlier_col[idx]) & 0xFFFF]] += float(packed.outlier_delta[idx])
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3, groupsize=16, qq_groupsize=16),
        dict(bits=2, groupsize=8, qq_groupsize=4, scale_bits=16, zero_bits=5, dense_rows=2),
        dict(bits=7, groupsize=32, qq_groupsize=8, scale_bits=4, zero_bits=16, outlier_density=0.0),
    ],
)
def test_dequantize_matches_scalar_reference(gen, kwargs):
    packed = random_packed(11, 45, gen, **kwargs)  # 45 columns: a partial last group
    packed.validate()
    torch.testing.assert_close(dequantize(packed).double(), _scalar_decode(packed), rtol=1e-6, atol=1e-6)


def test_validate_names_the_broken_tensor(gen):
    packed = random_packed(16, 40, gen)
    cases = {
        "qweight": dataclasses.replace(packed, qweight=packed.qweight[:, :-1]),
        "scale_meta": dataclasses.replace(packed, scale_meta=None),
        "perm": dataclasses.replace(packed, perm=torch.zeros_like(packed.perm)),
        "outlier_row_ptr": dataclasses.replace(packed, outlier_row_ptr=packed.outlier_row_ptr.flip(0)),
        "outlier_delta": dataclasses.replace(packed, outlier_delta=packed.outlier_delta.float()),
    }
    for name, broken in cases.items():
        with pytest.raises(ValueError, match=name):
            broken.validate()
    bad_col = packed.outlier_col.clone()
    bad_col[0] = 40
    with pytest.raises(ValueError, match="outlier_col"):
        dataclasses.replace(packed, outlier_col=bad_col).validate()
    with pytest.raises(ValueError, match="outlier_col"):
        dense = random_packed(4, 40, gen, dense_rows=1)
        col = dense.outlier_col.clone()
        col[1] = col[0]  # duplicate column in a row
        dataclasses.replace(dense, outlier_col=col).validate()


@pytest.mark.parametrize(
    "params",
    [
        SpQRParams(bits=3, groupsize=16, qq_groupsize=16, outlier_threshold=0.2),
        SpQRParams(bits=4, groupsize=16, qq_groupsize=16, outlier_threshold=0.1),
        SpQRParams(bits=3, groupsize=8, qq_groupsize=64, outlier_threshold=0.2),
        SpQRParams(bits=4, groupsize=128, qq_scale_bits=16, qq_zero_bits=16, outlier_threshold=float("inf")),
    ],
)
def test_stored_bits_match_the_paper_formula(gen, params):
    m = n = 1024
    weight = heavy_tailed_weight(m, n, gen)
    hessian = hessian_of(correlated_inputs(2048, n, gen))
    result = spqr_quantize(weight, hessian, params)
    stored = result.packed.storage_bits() / (m * n)
    formula = params.formula_bits(result.outlier_fraction)
    assert abs(stored - formula) <= 0.03 * formula, (stored, formula)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
def test_forward_matches_float64_reference(gen, dtype, tol, lead):
    packed = random_packed(24, 70, gen, outlier_density=0.03)
    bias = torch.randn(24, generator=gen)
    module = SpQRLinear.from_packed(packed, bias)
    x = torch.randn(*lead, 70, generator=gen).to(dtype)
    expected = x.double() @ dequantize(packed).double().t() + bias.double()
    got = module(x)
    assert got.dtype == dtype and got.shape == (*lead, 24)
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.double() / scale, expected / scale, rtol=tol, atol=tol)
    no_bias = SpQRLinear.from_packed(packed)(x)
    torch.testing.assert_close(no_bias.double() / scale, (expected - bias.double()) / scale, rtol=tol, atol=tol)


def test_module_passes_the_operator_the_same_arguments_as_its_packed_view(gen):
    """SpQRLinear.forward hands its buffers to the operator directly (ops.dispatch.spqr_linear_module):
    argument for argument what op_args makes of its PackedSpQR view, before and after a buffer swap."""
    for bias in (None, torch.randn(24, generator=gen)):
        module = SpQRLinear.from_packed(random_packed(24, 70, gen, outlier_density=0.03), bias)
        for _ in range(2):
            direct = _schema.buffer_args(module._buffers, module.geometry)
            via_view = _schema.op_args(module.packed, module.bias)
            assert len(direct) == len(via_view) == 17
            differing = [i for i, (a, b) in enumerate(zip(direct, via_view, strict=True)) if a is not b]
            assert not differing, differing
            module.qweight = module.qweight.clone()  # a replaced buffer is what the next call sees


def test_forward_honours_the_torch_backend_switch(gen, monkeypatch):
    """SPQR_HF_BACKEND=torch sends SpQRLinear.forward to the pure-torch reference, read on every call."""
    module = SpQRLinear.from_packed(random_packed(24, 70, gen, outlier_density=0.03), torch.randn(24, generator=gen))
    x = torch.randn(3, 70, generator=gen)
    calls = []
    real_reference = dispatch.spqr_linear_reference
    monkeypatch.setattr(dispatch, "spqr_linear_reference", lambda *args: calls.append(args) or real_reference(*args))
    monkeypatch.setenv("SPQR_HF_BACKEND", "torch")
    forced = module(x)
    assert len(calls) == 1 and calls[0][2] is module.bias
    torch.testing.assert_close(forced, real_reference(x, module.packed, module.bias), rtol=0, atol=0)
    monkeypatch.delenv("SPQR_HF_BACKEND")
    module(x)
    assert len(calls) == 1
    native = _extension.load()
    if native is not None:  # read by C getenv there (os.environ's Python mapping is slow on a cold cache)
        assert dispatch._getenv is native.getenv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_compiles_into_one_graph(gen, dtype):
    """torch.compile traces SpQRLinear without a graph break (the C builtins the eager call takes,
    getenv and the operator's C++ callable, have traceable stand-ins) and runs the same kernel."""
    module = SpQRLinear.from_packed(random_packed(48, 96, gen, outlier_density=0.02), torch.randn(48, generator=gen))
    x = torch.randn(5, 96, generator=gen).to(dtype)
    with torch.no_grad():
        eager = module(x)
        compiled = torch.compile(module, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_forward_rejects_wrong_width(gen):
    module = SpQRLinear.from_packed(random_packed(8, 32, gen))
    with pytest.raises(ValueError, match="32 features"):
        module(torch.randn(2, 31, generator=gen))


def test_state_dict_round_trips_through_safetensors(gen, tmp_path):
    packed = random_packed(40, 96, gen, scale_bits=16, outlier_density=0.02, dense_rows=3)
    module = SpQRLinear.from_packed(packed, torch.randn(40, generator=gen).half())
    path = tmp_path / "layer.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    fresh = SpQRLinear(96, 40, bits=3, groupsize=16, qq_groupsize=16, scale_bits=16, zero_bits=3,
                       nnz=packed.nnz, bias=True, bias_dtype=torch.float16)
    fresh.load_state_dict(safetensors.torch.load_file(str(path)))
    fresh.packed.validate()
    assert torch.equal(fresh.dequantize(), module.dequantize())
    assert fresh.storage_bits_per_weight() == module.storage_bits_per_weight()


def test_module_dtype_casts_keep_the_packed_format(gen):
    packed = random_packed(16, 48, gen, outlier_density=0.05)
    module = SpQRLinear.from_packed(packed, torch.randn(16, generator=gen))
    before = module.dequantize()
    module.to(torch.bfloat16)
    module.half()
    module.packed.validate()  # float16 meta / deltas and int buffers untouched
    assert module.bias.dtype == torch.float16
    assert torch.equal(module.dequantize(), before)
