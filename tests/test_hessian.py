"""HessianAccumulator: streaming, token-weighted, any input shape."""

from __future__ import annotations

import pytest
import torch

from spqr_hf.core import HessianAccumulator

from synthetic import correlated_inputs, hessian_of


@pytest.mark.parametrize("width", [24, 700, 1100])  # 1, 2 and 3 row strips of the lower triangle
def test_streaming_matches_batch_formula(gen, width):
    x = correlated_inputs(300, width, gen)
    acc = HessianAccumulator(width)
    # Uneven batches of different leading shapes: [7, w], [2, 10, w], [3, 31, w], rest.
    acc.add_batch(x[:7])
    acc.add_batch(x[7:27].reshape(2, 10, width))
    acc.add_batch(x[27:120].reshape(3, 31, width))
    acc.add_batch(x[120:])
    assert acc.num_tokens == 300
    torch.testing.assert_close(acc.hessian, hessian_of(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.hessian, acc.hessian.t())


def test_empty_batch_is_ignored_and_wrong_width_rejected(gen):
    acc = HessianAccumulator(8)
    acc.add_batch(torch.zeros(0, 8))
    assert acc.num_tokens == 0
    with pytest.raises(ValueError, match="last dimension 8"):
        acc.add_batch(torch.randn(4, 9, generator=gen))


@pytest.mark.parametrize("width", [96, 1100])
def test_bfloat16_inputs_use_bf16_products_within_stated_error(gen, width):
    """bfloat16 activations take the bf16-matmul path: float32 sums of bf16-rounded chunk products."""
    x = correlated_inputs(5000, width, gen).to(torch.bfloat16)
    acc = HessianAccumulator(width)
    acc.add_batch(x[:3000])
    acc.add_batch(x[3000:])
    expected = hessian_of(x.float())
    rel = float((acc.hessian - expected).norm() / expected.norm())
    assert 0 < rel < 2e-3  # not bit-identical to float32, but within bf16 rounding of chunk sums
    assert torch.equal(acc.hessian, acc.hessian.t())
