"""Streaming accumulation of the layer Hessian H = 2/N * sum_t x_t x_t^T (SpQR/GPTQ eq. 1)."""

from __future__ import annotations

import torch

BF16_PRODUCTS = True  # see add_batch
_BF16_CHUNK = 2048


class HessianAccumulator:
    """Token-weighted running Hessian of a linear layer's inputs, in float32.

    ``add_batch`` takes inputs of any shape ``[..., in_features]``; after any sequence of
    batches ``hessian`` equals ``2/N * X^T X`` over all ``N`` tokens seen so far.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"Hessian expects inputs with last dimension {self.in_features}, got shape {tuple(inputs.shape)}"
            )
        x = inputs.reshape(-1, self.in_features).to(device=self.hessian.device)
        tokens = x.shape[0]
        if tokens == 0:
            return
        total = self.num_tokens + tokens
        self.hessian.mul_(self.num_tokens / total)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and BF16_PRODUCTS:
            # bfloat16 activations (bf16 calibration): native bf16 matmuls with float32 accumulation
            # are ~2x faster on CPUs with AVX512-BF16. Each chunk's X^T X is rounded to bfloat16
            # once (2^-9 relative) and chunks are summed in float32, so the error averages down.
            for start in range(0, tokens, _BF16_CHUNK):
                chunk = x[start:start + _BF16_CHUNK]
                self.hessian.add_((chunk.t() @ chunk).to(torch.float32), alpha=2.0 / total)
        else:
            x = x.to(torch.float32)
            self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.num_tokens = total
