"""``SpQRLinear``: a drop-in ``nn.Linear`` replacement that holds only packed SpQR buffers."""

from __future__ import annotations

import torch
from torch import nn

from spqr_hf.format import layout
from spqr_hf.format.pack import PackedSpQR, dequantize
from spqr_hf.ops import cpu_layout
from spqr_hf.ops.dispatch import force_reference, spqr_linear_module

# PackedSpQR's integer fields, in its (and the operator's) order.
_INT_FIELDS = ("in_features", "out_features", "bits", "groupsize", "qq_groupsize", "scale_bits", "zero_bits")


class SpQRLinear(nn.Module):
    """Linear layer whose weight is stored in the packed SpQR layout.

    Every packed tensor is a registered buffer (so ``state_dict``/safetensors carry it); the
    integer geometry (sizes, bits, group sizes) comes from the constructor, i.e. from the
    quantization config when a checkpoint is reloaded. ``nnz`` sizes the outlier buffers.

    On a CPU with the plane-layout kernels (:mod:`spqr_hf.ops.cpu_layout`), the first call rearranges
    the ``qweight``, ``scale_meta`` and ``zero_meta`` buffers into the plane form (faster decoding, same
    bytes); ``state_dict``, ``load_state_dict`` and ``.to()`` see or restore the checkpoint form, so
    checkpoints and every other path only ever meet the format of :mod:`spqr_hf.format.layout`.
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
        self._planes = False  # whether the buffers hold the CPU plane form (cpu_layout.PLANE_BUFFERS)
        self._layout_chosen = False  # whether a call has chosen the layout (forward reads one flag)

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
        device may change for them (their dtypes are part of the format); the bias follows. The
        checkpoint form is restored first: the plane form is a CPU form, rebuilt on the next call."""
        self._use_rows()
        packed = {name: getattr(self, name) for name in self.packed.tensors()}
        super()._apply(fn, recurse)
        for name, before in packed.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def _row_buffers(self) -> dict[str, torch.Tensor | None]:
        """The buffers the plane form changes, in the checkpoint form: converted (new tensors) while
        the module holds the plane form, else its own."""
        if self._planes:
            return cpu_layout.buffers_to_rows(self._buffers, cpu_layout.Geometry.of(self))
        return {name: self._buffers[name] for name in cpu_layout.PLANE_BUFFERS}

    def _use_rows(self) -> None:
        """Put the checkpoint form back into the buffers (a no-op unless they hold the plane form)."""
        if self._planes:
            with torch.no_grad():
                self._buffers.update(self._row_buffers())
            self._planes = False
        self._layout_chosen = False

    def _choose_layout(self, x: torch.Tensor) -> None:
        """On the first call: the plane form, where this CPU's kernels and the layer take it (and
        ``SPQR_HF_CPU_LAYOUT=rows`` does not keep the checkpoint form)."""
        self._layout_chosen = True
        if (x.device.type == "cpu" and self._buffers["qweight"].device.type == "cpu" and not force_reference()
                and not torch.compiler.is_compiling() and cpu_layout.wanted() and cpu_layout.kernels_available()
                and cpu_layout.layer_fits(self.in_features, self.groupsize, self.bits)):
            with torch.no_grad():
                self._buffers.update(cpu_layout.buffers_to_planes(self._buffers, cpu_layout.Geometry.of(self)))
            self._planes = True

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Checkpoints get the checkpoint form whatever the form in memory."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._planes:
            for name, tensor in self._row_buffers().items():
                if tensor is not None:
                    destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Loads into the checkpoint form (the one the checkpoint has)."""
        self._use_rows()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def packed(self) -> PackedSpQR:
        """The packed tensors as a :class:`PackedSpQR` view (no copy, but for the plane form's buffers
        while the module holds it: then they are converted to the checkpoint form).

        Built on every forward of the reference path, so it reads ``_buffers`` directly: ten
        ``nn.Module.__getattr__`` lookups cost more than a small layer's whole native matvec.
        """
        buffers, rows = self._buffers, self._row_buffers()
        return PackedSpQR(
            *self.geometry,
            qweight=rows["qweight"], scale_codes=rows["scale_codes"], zero_codes=rows["zero_codes"],
            scale_meta=rows["scale_meta"], zero_meta=rows["zero_meta"], perm=buffers["perm"],
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
        if not self._layout_chosen:
            self._choose_layout(x)
        return spqr_linear_module(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groupsize={self.groupsize}, qq_groupsize={self.qq_groupsize}, "
            f"stat_bits=({self.scale_bits}, {self.zero_bits}), nnz={self.nnz}, bias={self.bias is not None}"
        )
