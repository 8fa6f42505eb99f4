"""Synthetic layers with realistic structure, shared by the engine and format tests."""

from __future__ import annotations

import torch


def correlated_inputs(tokens: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Activations with correlated features and uneven per-feature scales, like a real layer's."""
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    scales = torch.rand(dim, generator=gen) * 2 + 0.1
    return (torch.randn(tokens, dim, generator=gen) @ mix) * scales


def heavy_tailed_weight(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights: a few large entries, like a transformer projection."""
    normal = torch.randn(out_features, in_features, generator=gen)
    chi2 = torch.randn(out_features, in_features, 3, generator=gen).square().sum(-1) / 3
    return 0.02 * normal / chi2.sqrt()


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    """2/N X^T X in float64 then float32: the reference for the streaming accumulator."""
    x = inputs.double()
    return (2.0 / x.shape[0] * x.t() @ x).float()


def random_packed(
    out_features: int,
    in_features: int,
    gen: torch.Generator,
    *,
    bits: int = 3,
    groupsize: int = 16,
    qq_groupsize: int = 16,
    scale_bits: int = 3,
    zero_bits: int = 3,
    outlier_density: float = 0.01,
    dense_rows: int = 0,
):
    """A valid packed layer with random codes/statistics and a random CSR outlier pattern.

    ``dense_rows`` rows get outliers in every column (stress for CSR handling).
    """
    from spqr_hf.format import layout
    from spqr_hf.format.pack import PackedSpQR, pack_bits

    m, n = out_features, in_features
    n_groups, n_chunks = layout.num_groups(n, groupsize), layout.num_groups(m, qq_groupsize)

    def stat(bits_: int, low: float, high: float):
        if bits_ == layout.RAW_STAT_BITS:
            values = (torch.rand(n_groups, m, generator=gen) * (high - low) + low).half()
            return pack_bits(values.view(torch.int16).to(torch.int64) & 0xFFFF, 16), None
        codes = torch.randint(0, 1 << bits_, (n_groups, m), generator=gen)
        step = (torch.rand(n_groups, n_chunks, generator=gen) * (high - low) / (1 << bits_)).clamp_min(1e-3)
        zero = torch.rand(n_groups, n_chunks, generator=gen) * (1 << bits_) * -0.5
        return pack_bits(codes, bits_), torch.stack([step, zero], dim=-1).half()

    scale_codes, scale_meta = stat(scale_bits, 0.002, 0.02)
    zero_codes, zero_meta = stat(zero_bits, 0.0, float((1 << bits) - 1))
    mask = torch.rand(m, n, generator=gen) < outlier_density
    mask[:dense_rows] = True
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=m)
    return PackedSpQR(
        in_features=n, out_features=m, bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
        scale_bits=scale_bits, zero_bits=zero_bits,
        qweight=pack_bits(torch.randint(0, 1 << bits, (m, n), generator=gen), bits),
        scale_codes=scale_codes, zero_codes=zero_codes, scale_meta=scale_meta, zero_meta=zero_meta,
        perm=layout.to_uint16_storage(torch.randperm(n, generator=gen)),
        outlier_row_ptr=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32),
        outlier_col=layout.to_uint16_storage(cols),
        outlier_delta=(torch.randn(cols.numel(), generator=gen) * 0.05).half(),
    )
