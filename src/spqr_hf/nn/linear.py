"""``SpQRLinear``: a drop-in ``nn.Linear`` replacement that holds only packed SpQR buffers."""

from __future__ import annotations

import torch
from torch import nn

from spqr_hf.format import layout
from spqr_hf.format.pack import PackedSpQR, dequantize
from spqr_hf.ops.dispatch import spqr_linear_module

# PackedSpQR's integer fields, in its (and the operator's) order.
_INT_FIELDS = ("in_features", "out_features", "bits", "groupsize", "qq_groupsize", "scale_bits", "zero_bits")


class SpQRLinear(nn.Module):
    """Linear layer whose weight is stored in the packed SpQR layout.

    Every packed tensor is a registered buffer (so ``state_dict``/safetensors carry it); the
    integer geometry (sizes, bits, group sizes) comes from the constructor, i.e. from the
    quantization config when a checkpoint is reloaded. ``nnz`` sizes the outlier buffers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        groupsize: int,
        qq_groupsize: int,
        scale_bits: int,
        zero_bits: int,
        nnz: int = 0,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groupsize, self.qq_groupsize = bits, groupsize, qq_groupsize
        self.scale_bits, self.zero_bits = scale_bits, zero_bits
        # PackedSpQR's integer fields in order: the operator's trailing arguments (ops.dispatch).
        self.geometry = tuple(getattr(self, name) for name in _INT_FIELDS)
        shapes = layout.buffer_shapes(in_features, out_features, bits, groupsize, qq_groupsize,
                                      scale_bits, zero_bits, nnz)
        for name in ("scale_meta", "zero_meta"):
            if name not in shapes:
                self.register_buffer(name, None)
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        bias_tensor = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @classmethod
    def from_packed(cls, packed: PackedSpQR, bias: torch.Tensor | None = None) -> SpQRLinear:
        """Wrap already-packed tensors (validated first) into a module, without copying them."""
        packed.validate()
        module = cls(
            **{name: getattr(packed, name) for name in _INT_FIELDS},
            nnz=packed.nnz, bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32, device="meta",
        )
        for name, tensor in packed.tensors().items():
            setattr(module, name, tensor)
        if bias is not None:
            if bias.shape != (packed.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({packed.out_features},)")
            module.bias = bias.detach().clone()
        return module

    def _apply(self, fn, recurse: bool = True):
        """Keep the packed buffers' dtypes through ``model.to(dtype)`` / ``.half()``: only the
        device may change for them (their dtypes are part of the format); the bias follows."""
        packed = {name: getattr(self, name) for name in self.packed.tensors()}
        super()._apply(fn, recurse)
        for name, before in packed.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    @property
    def packed(self) -> PackedSpQR:
        """The packed tensors as a :class:`PackedSpQR` view (no copy).

        Built on every forward, so it reads ``_buffers`` directly: ten ``nn.Module.__getattr__``
        lookups cost more than a small layer's whole native matvec.
        """
        buffers = self._buffers
        return PackedSpQR(
            *self.geometry,
            qweight=buffers["qweight"], scale_codes=buffers["scale_codes"], zero_codes=buffers["zero_codes"],
            scale_meta=buffers["scale_meta"], zero_meta=buffers["zero_meta"], perm=buffers["perm"],
            outlier_row_ptr=buffers["outlier_row_ptr"], outlier_col=buffers["outlier_col"],
            outlier_delta=buffers["outlier_delta"],
        )

    @property
    def nnz(self) -> int:
        return int(self.outlier_col.numel())

    @property
    def outlier_fraction(self) -> float:
        """Fraction of weights kept as sparse float16 outliers."""
        return self.nnz / max(1, self.in_features * self.out_features)

    def storage_bits_per_weight(self) -> float:
        """Stored bits of all packed buffers (bias excluded) per weight."""
        return self.packed.storage_bits() / max(1, self.in_features * self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight ``[out, in]``: exactly what the quantizer reconstructed."""
        return dequantize(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SpQRLinear expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        return spqr_linear_module(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groupsize={self.groupsize}, qq_groupsize={self.qq_groupsize}, "
            f"stat_bits=({self.scale_bits}, {self.zero_bits}), nnz={self.nnz}, bias={self.bias is not None}"
        )
