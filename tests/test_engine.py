"""The SpQR engine: quality ranking, outliers, exact reconstruction, bad input, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import spqr_hf.core.spqr as engine
from spqr_hf import SpQRConfig, SpQRLinear, quantize_weight
from spqr_hf.core import SpQRParams, gptq_params, round_to_nearest, spqr_quantize
from spqr_hf.core.bilevel import quantize_statistic, refine_statistic_pair
from spqr_hf.core.outliers import leave_one_out_reduction
from spqr_hf.core.quant_grid import fit_minmax, quantize_dequantize
from spqr_hf.format.layout import affine
from spqr_hf.format.pack import dequantize

from synthetic import correlated_inputs, heavy_tailed_weight, hessian_of


def layer(gen: torch.Generator, out_features: int = 256, in_features: int = 256, tokens: int = 2048):
    weight = heavy_tailed_weight(out_features, in_features, gen)
    return weight, hessian_of(correlated_inputs(tokens, in_features, gen))


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error trace((W-Q) H (W-Q)^T) / trace(W H W^T), in float64."""
    diff, h, w = (weight - approx).double(), hessian.double(), weight.double()
    return float(torch.trace(diff @ h @ diff.t()) / torch.trace(w @ h @ w.t()))


def test_spqr_beats_gptq_beats_rtn(gen):
    weight, hessian = layer(gen)
    params = SpQRParams(bits=3, groupsize=16, qq_groupsize=16, outlier_threshold=0.2)
    errors = {
        "spqr": hessian_error(weight, dequantize(spqr_quantize(weight, hessian, params).packed), hessian),
        "gptq": hessian_error(weight, dequantize(spqr_quantize(weight, hessian, gptq_params(params)).packed), hessian),
        "rtn": hessian_error(weight, dequantize(round_to_nearest(weight, gptq_params(params)).packed), hessian),
    }
    assert errors["spqr"] < errors["gptq"] < errors["rtn"], errors
    assert errors["spqr"] < 0.7 * errors["gptq"], errors  # outliers matter on heavy-tailed weights


def test_round_to_nearest_is_plain_minmax_rounding(gen):
    weight = heavy_tailed_weight(40, 64, gen)
    params = gptq_params(SpQRParams(bits=4, groupsize=16))
    got = dequantize(round_to_nearest(weight, params).packed)
    groups = weight.view(40, 4, 16)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).half().float()  # 16-bit statistics
    zero = (-lo / ((hi - lo) / 15)).half().float()
    expected = quantize_dequantize(groups, scale, zero, 15).view(40, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_outlier_fraction_falls_with_threshold_and_is_zero_at_infinity(gen):
    weight, hessian = layer(gen, 128, 128, 1024)
    fractions = [
        spqr_quantize(weight, hessian, SpQRParams(outlier_threshold=tau)).outlier_fraction
        for tau in (0.02, 0.1, 0.5, 2.0, math.inf)
    ]
    assert fractions[0] > 0.01
    assert all(a > b for a, b in zip(fractions[:-2], fractions[1:-1], strict=True)), fractions
    assert fractions[-2] <= fractions[-3] and fractions[-1] == 0.0, fractions


@pytest.mark.parametrize(
    "shape, params",
    [
        ((37, 53), SpQRParams(bits=3, groupsize=8, qq_groupsize=4)),
        ((64, 300), SpQRParams(bits=2, groupsize=-1, qq_groupsize=-1, qq_scale_bits=16, qq_zero_bits=5)),
        ((130, 513), SpQRParams(bits=8, groupsize=256, qq_groupsize=32, outlier_threshold=0.05)),
        ((96, 200), SpQRParams(bits=4, groupsize=32, qq_groupsize=64, act_order=False, blocksize=32)),
        ((50, 90), SpQRParams(bits=5, groupsize=4, qq_groupsize=8, simplified_outliers=True)),
        ((17, 576), SpQRParams(bits=6, groupsize=128, qq_groupsize=16, qq_scale_bits=16, qq_zero_bits=16)),
    ],
)
def test_dequantize_is_bit_identical_to_engine_reconstruction(gen, shape, params):
    weight, hessian = layer(gen, *shape, tokens=512)
    result = spqr_quantize(weight, hessian, params, keep_reconstruction=True)
    assert torch.equal(dequantize(result.packed), result.reconstruction)
    # Every column is quantized (none silently dropped) and close to the original.
    max_err = (result.reconstruction - weight).abs().amax(dim=0)
    assert bool((max_err < weight.abs().amax(dim=0) + 1e-6).all())


def test_non_multiple_dimensions_keep_every_column(gen):
    weight, hessian = layer(gen, 33, 70, 512)  # 70 = 4 groups of 16 + 6
    result = spqr_quantize(weight, hessian, SpQRParams(bits=4, outlier_threshold=math.inf), keep_reconstruction=True)
    rel = (result.reconstruction - weight).norm(dim=0) / weight.norm(dim=0)
    assert float(rel.max()) < 0.35, rel  # 4-bit groups of 16: no column left unquantized


def test_outliers_reproduce_their_weights_almost_exactly(gen):
    weight, hessian = layer(gen, 64, 64, 512)
    result = spqr_quantize(weight, hessian, SpQRParams(outlier_threshold=0.05), keep_reconstruction=True)
    packed = result.packed
    assert packed.nnz > 0
    # Outliers sit where the dense grid alone would be far off: their reconstruction error is
    # only the float16 rounding of the stored correction, far below the layer's typical error.
    dense_only = dataclasses.replace(packed, outlier_col=packed.outlier_col[:0], outlier_delta=packed.outlier_delta[:0],
                                     outlier_row_ptr=torch.zeros_like(packed.outlier_row_ptr))
    diff = (dequantize(packed) - dequantize(dense_only)) != 0
    assert int(diff.sum()) == packed.nnz


def test_leave_one_out_matches_brute_force(gen):
    group = torch.randn(10, 300, generator=gen)  # [g, m]: 10 columns, 300 rows
    group[3, :5] = group[7, :5]  # some tied values
    group[:, 10] = 0.5  # a constant row
    d = torch.rand(10, generator=gen) + 0.5
    maxq = 7
    fast = leave_one_out_reduction(group, d, maxq)

    def error(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        lo, hi = values.amin(0), values.amax(0)
        scale = ((hi - lo) / maxq).clamp_min(torch.finfo(values.dtype).tiny)
        return (((values - quantize_dequantize(values, scale, -lo / scale, maxq)) / weights[:, None]) ** 2).sum(0)

    base = error(group, d)
    for k in range(10):
        keep = [i for i in range(10) if i != k]
        expected = base - error(group[keep], d[keep])
        torch.testing.assert_close(fast[k], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, stat_bits", [(3, (3, 3)), (4, (3, 3)), (2, (2, 4)), (4, (16, 3))])
def test_statistic_refinement_never_raises_group_error_and_decodes_exactly(gen, bits, stat_bits):
    maxq, qq_groupsize = (1 << bits) - 1, 16
    group = heavy_tailed_weight(200, 16, gen).t().contiguous()  # [g, m]: 16 columns, 200 rows
    column_weight = torch.rand(16, generator=gen) + 0.2
    scale, zero = fit_minmax(group, maxq)
    nearest = tuple(quantize_statistic(v, b, qq_groupsize) for v, b in zip((scale, zero), stat_bits, strict=True))
    refined = refine_statistic_pair(group, column_weight, maxq, (scale, zero), nearest, stat_bits, qq_groupsize)

    def error(pair) -> torch.Tensor:
        grid = quantize_dequantize(group, pair[0].decoded, pair[1].decoded, maxq)
        return ((group - grid).square() * column_weight[:, None]).sum(0)

    assert bool((error(refined) <= error(nearest)).all())
    if stat_bits[0] < 16:  # the gains come from a quantized scale (a rounded-down one clips)
        assert float(error(refined).sum()) < 0.97 * float(error(nearest).sum())
    for stat, before, bits_ in zip(refined, nearest, stat_bits, strict=True):
        if stat.meta is None:  # raw statistics are kept as they are
            assert torch.equal(stat.codes, before.codes)
        else:  # a neighbour of the nearest code, decoded as the packed format decodes it
            assert 0 <= int(stat.codes.min()) and int(stat.codes.max()) <= (1 << bits_) - 1
            assert bool(((stat.codes - before.codes).abs() <= 1).all())
            chunk = torch.arange(200) // qq_groupsize
            meta = stat.meta.float()
            assert torch.equal(stat.decoded, affine(stat.codes, meta[chunk, 0], meta[chunk, 1]))


@pytest.mark.parametrize("bits", [3, 4])
def test_statistic_refinement_lowers_layer_error(gen, bits, monkeypatch):
    weight, hessian = layer(gen)
    params = SpQRParams(bits=bits, groupsize=16, qq_groupsize=16, outlier_threshold=0.2)
    refined = hessian_error(weight, dequantize(spqr_quantize(weight, hessian, params).packed), hessian)
    monkeypatch.setattr(engine, "REFINE_STATISTICS", False)
    nearest = hessian_error(weight, dequantize(spqr_quantize(weight, hessian, params).packed), hessian)
    assert refined < 0.97 * nearest, (refined, nearest)


def test_deterministic(gen):
    weight, hessian = layer(gen, 80, 96, 512)
    a = spqr_quantize(weight, hessian, SpQRParams()).packed.tensors()
    b = spqr_quantize(weight, hessian, SpQRParams()).packed.tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dead_inputs_are_zeroed_and_hessian_retry_warns(gen):
    weight = heavy_tailed_weight(32, 48, gen)
    x = correlated_inputs(16, 48, gen)  # 16 tokens: rank-deficient Hessian
    x[:, 5] = 0.0  # a dead input feature
    hessian = hessian_of(x)
    with pytest.warns(UserWarning, match="not positive definite"):
        result = spqr_quantize(weight, hessian, SpQRParams(damp_percent=0.0), keep_reconstruction=True)
    assert result.damp_percent > 0
    # A dead input's weights cannot matter: they are zeroed before quantization.
    changed = weight.clone()
    changed[:, 5] = torch.randn(32, generator=gen)
    with pytest.warns(UserWarning, match="not positive definite"):
        again = spqr_quantize(changed, hessian, SpQRParams(damp_percent=0.0), keep_reconstruction=True)
    assert torch.equal(again.reconstruction, result.reconstruction)


@pytest.mark.parametrize(
    "weight, hessian, match",
    [
        (torch.full((8, 8), float("nan")), torch.eye(8), "NaN or infinite"),
        (torch.ones(8, 8).index_fill_(0, torch.tensor([2]), float("inf")), torch.eye(8), "NaN or infinite"),
        (torch.ones(8, 8) * 1e6, torch.eye(8), "float16 range"),
        (torch.randn(8, 8), torch.eye(9), r"shape \(8, 8\)"),
        (torch.randn(8, 8), torch.eye(8).index_fill_(0, torch.tensor([1]), float("nan")), "hessian contains NaN"),
        (torch.zeros(0, 8), torch.eye(8), "empty"),
        (torch.randn(8), torch.eye(8), "2-D"),
        (torch.randint(0, 3, (8, 8)), torch.eye(8), "floating point"),
    ],
)
def test_bad_input_raises_clear_error(weight, hessian, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(weight, hessian, SpQRConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"bits": 3.0}, "bits"),
        ({"groupsize": 12}, "groupsize"), ({"groupsize": 512}, "groupsize"), ({"groupsize": 2}, "groupsize"),
        ({"qq_groupsize": 3}, "qq_groupsize"), ({"qq_scale_bits": 1}, "qq_scale_bits"),
        ({"qq_zero_bits": 12}, "qq_zero_bits"), ({"outlier_threshold": 0}, "outlier_threshold"),
        ({"outlier_threshold": float("nan")}, "outlier_threshold"), ({"damp_percent": -1}, "damp_percent"),
        ({"blocksize": 100}, "blocksize"),
    ],
)
def test_config_rejects_out_of_range_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpQRConfig(**kwargs)
    with pytest.raises(ValueError, match=field):
        SpQRParams(**kwargs)


def test_quantize_weight_returns_module_with_bias(gen):
    weight, hessian = layer(gen, 24, 40, 256)
    bias = torch.randn(24, generator=gen)
    module = quantize_weight(weight, hessian, SpQRConfig(bits=4), bias=bias)
    assert isinstance(module, SpQRLinear)
    assert torch.equal(module.bias, bias)
    assert module.outlier_fraction == module.nnz / (24 * 40)


def test_shared_hessian_pass_matches_separate_layers(gen):
    """q/k/v-style layers quantized in one pass: each exact to its decoder and ~its own run."""
    from spqr_hf.core.spqr import spqr_quantize_shared

    hessian = hessian_of(correlated_inputs(512, 64, gen))
    weights = [heavy_tailed_weight(rows, 64, gen) * scale for rows, scale in ((48, 1.0), (16, 3.0), (32, 0.5))]
    params = SpQRParams(bits=3, groupsize=16, qq_groupsize=16, outlier_threshold=0.2)
    shared = spqr_quantize_shared(weights, hessian, params, keep_reconstruction=True)
    for weight, result in zip(weights, shared, strict=True):
        alone = spqr_quantize(weight, hessian, params, keep_reconstruction=True)
        assert torch.equal(dequantize(result.packed), result.reconstruction)
        assert result.packed.out_features == weight.shape[0]
        torch.testing.assert_close(result.reconstruction, alone.reconstruction, rtol=0, atol=1e-4)
        assert abs(result.packed.nnz - alone.packed.nnz) <= max(2, alone.packed.nnz // 20)
    # Layers whose rows do not fill whole second-level chunks fall back to separate passes.
    odd = spqr_quantize_shared([weights[0][:40], weights[1]], hessian, params)
    assert [r.packed.out_features for r in odd] == [40, 16]
    small = spqr_quantize_shared([weights[1][:8], weights[1][8:]], hessian, params, keep_reconstruction=True)
    for result in small:  # fewer rows than one chunk: separate passes, each its own chunk
        assert result.packed.qq_groupsize == 8
        assert torch.equal(dequantize(result.packed), result.reconstruction)


@pytest.mark.parametrize("stat_bits", [3, 16])
def test_nearly_flat_groups_far_from_zero_stay_finite(gen, stat_bits):
    """A group whose weights are equal up to rounding noise used to get a ~0 scale and a zero
    point beyond float16 (NaN weights, or a packing error)."""
    weight = torch.randn(64, 64, generator=gen) * 0.02
    weight[5, :8] = 0.5
    weight[5, 3] = 0.5 + 1e-7
    weight[9, 8:16] = -0.25
    weight[9, 10] = -0.25 - 3e-8
    params = SpQRParams(bits=3, groupsize=8, qq_groupsize=64 if stat_bits == 3 else 16,
                        qq_scale_bits=stat_bits, qq_zero_bits=stat_bits)
    result = spqr_quantize(weight, torch.eye(64) + 0.01, params, keep_reconstruction=True)
    assert bool(torch.isfinite(result.reconstruction).all())
    assert torch.equal(dequantize(result.packed), result.reconstruction)
    assert float((result.reconstruction[5, :8] - 0.5).abs().max()) < 1e-3
