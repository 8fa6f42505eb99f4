"""Streaming accumulation of the layer Hessian H = 2/N * sum_t x_t x_t^T (SpQR/GPTQ eq. 1)."""

from __future__ import annotations

import torch

BF16_PRODUCTS = True  # see add_batch
_BF16_CHUNK = 2048


def _row_strips(dim: int) -> list[tuple[int, int]]:
    """Row ranges covering the lower triangle of a [dim, dim] Gram matrix in a few matmuls.

    Strip ``[a, b)`` computes rows a..b-1 against columns 0..b-1, so k strips cost (k+1)/(2k)
    of the full product; 2-4 strips keep each matmul large enough to run at full speed
    (measured on a 2-core AVX512-BF16 CPU: 1536 wide, 3 strips, 0.61 s instead of 0.87-1.0 s).
    """
    count = 1 if dim < 256 else 2 if dim < 1024 else 3 if dim < 4096 else 4
    edges = [dim * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class HessianAccumulator:
    """Token-weighted running Hessian of a linear layer's inputs, in float32.

    ``add_batch`` takes inputs of any shape ``[..., in_features]``; after any sequence of
    batches ``hessian`` equals ``2/N * X^T X`` over all ``N`` tokens seen so far. Only the lower
    triangle is accumulated (H is symmetric); ``hessian`` mirrors it when read.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self._lower = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._strips = _row_strips(in_features)
        self.num_tokens = 0

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric Hessian (a new tensor)."""
        return torch.tril(self._lower) + torch.tril(self._lower, diagonal=-1).t()

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"Hessian expects inputs with last dimension {self.in_features}, got shape {tuple(inputs.shape)}"
            )
        x = inputs.reshape(-1, self.in_features).to(device=self._lower.device)
        tokens = x.shape[0]
        if tokens == 0:
            return
        total = self.num_tokens + tokens
        self._lower.mul_(self.num_tokens / total)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and BF16_PRODUCTS:
            # bfloat16 activations (bf16 calibration): native bf16 matmuls with float32 accumulation
            # are ~2x faster on CPUs with AVX512-BF16. Each chunk's X^T X is rounded to bfloat16
            # once (2^-9 relative) and chunks are summed in float32, so the error averages down.
            for start in range(0, tokens, _BF16_CHUNK):
                chunk = x[start:start + _BF16_CHUNK]
                chunk_t = chunk.t()
                for a, b in self._strips:
                    self._lower[a:b, :b].add_((chunk_t[a:b] @ chunk[:, :b]).to(torch.float32), alpha=2.0 / total)
        else:
            x = x.to(torch.float32)
            for a, b in self._strips:
                self._lower[a:b, :b].addmm_(x[:, a:b].t(), x[:, :b], alpha=2.0 / total)
        self.num_tokens = total
