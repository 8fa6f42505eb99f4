"""Module surgery between transformers models and ``SpQRLinear`` (no policy, no calibration).

* :func:`replace_with_spqr_placeholders`: before a checkpoint's weights load (model on meta),
  swap each quantized linear for an empty ``SpQRLinear`` sized from the config (outlier
  counts differ per layer, so ``quantized_layers`` records them).
* :func:`check_checkpoint_tensors`: read the safetensors headers and name any packed tensor
  that is missing or has the wrong shape / dtype, before anything is loaded.
* :func:`dequantize_model`: the inverse swap, back to dense ``nn.Linear`` / ``Conv1D``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spqr_hf.calibrate.blocks import in_out_features, is_quantizable_linear
from spqr_hf.calibrate.forward import has_own_tensors
from spqr_hf.nn.linear import SpQRLinear

_SAFETENSORS_DTYPES = {"I32": torch.int32, "I16": torch.int16, "F16": torch.float16, "F32": torch.float32,
                       "BF16": torch.bfloat16, "I64": torch.int64, "F64": torch.float64, "U8": torch.uint8}


class CheckpointError(ValueError):
    """A quantized checkpoint is incomplete or inconsistent with its config."""


def resolve_module_name(model: nn.Module, name: str) -> str | None:
    """``name`` as recorded at quantization time, adjusted for a model with or without the LM head wrapper."""
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return None


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def placeholder_for(layer: nn.Module, config: Any, nnz: int) -> SpQRLinear:
    """An empty ``SpQRLinear`` on meta with the geometry quantization gave ``layer``."""
    params = config.engine_params()
    in_features, out_features = in_out_features(layer)
    bias = getattr(layer, "bias", None)
    module = SpQRLinear(
        in_features, out_features, bits=params.bits,
        groupsize=params.effective_groupsize(in_features),
        qq_groupsize=params.effective_qq_groupsize(out_features),
        scale_bits=params.qq_scale_bits, zero_bits=params.qq_zero_bits, nnz=nnz,
        bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32, device="meta",
    )
    module.source_type = type(layer).__name__
    return module


def replace_with_spqr_placeholders(model: nn.Module, config: Any) -> dict[str, str]:
    """Swap every layer named in ``config.quantized_layers``; returns {recorded name: name in this model}."""
    layers = config.quantized_layers or {}
    if not layers:
        raise CheckpointError(
            "this SpQR checkpoint's quantization_config lists no quantized layers (quantized_layers is empty); "
            "the config.json is incomplete or was not written by spqr_hf"
        )
    resolved = {}
    for recorded, nnz in layers.items():
        name = resolve_module_name(model, recorded)
        if name is None:
            raise CheckpointError(
                f"quantized layer {recorded!r} from the checkpoint's config does not exist in {type(model).__name__}; "
                "load the checkpoint with the model class it was saved from (e.g. AutoModelForCausalLM)"
            )
        layer = model.get_submodule(name)
        if not is_quantizable_linear(layer):
            raise CheckpointError(f"{name} is a {type(layer).__name__}, not a linear layer SpQR could have quantized")
        _set_module(model, name, placeholder_for(layer, config, nnz))
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if not has_own_tensors(parent):
            # Parents without tensors of their own have nothing to initialise; some models' init code
            # (GPT-2's scaled c_proj init) would otherwise reach for the replaced layer's `.weight`.
            parent._is_hf_initialized = True
        resolved[recorded] = name
    return resolved


def _read_headers(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in checkpoint_files:
        if not os.fspath(file).endswith(".safetensors"):
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    headers[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {err} (truncated or corrupted checkpoint file?)") from err
        size = os.path.getsize(file)
        if size < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes)")
    return headers


def check_checkpoint_tensors(model: nn.Module, checkpoint_files: list[str] | None, names: dict[str, str]) -> None:
    """Raise :class:`CheckpointError` naming the first packed tensor missing or mis-shaped in the files."""
    if not checkpoint_files:
        return
    files = [os.fspath(f) for f in checkpoint_files]
    if not all(f.endswith(".safetensors") for f in files):
        return  # other formats are checked by transformers' own missing-key report
    headers = _read_headers(files)
    prefix = getattr(model, "base_model_prefix", "")
    for name in names.values():
        module = model.get_submodule(name)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            key = f"{name}.{buffer_name}"
            candidates = [key, f"{prefix}.{key}", key.removeprefix(prefix + ".")] if prefix else [key]
            found = next((headers[c] for c in candidates if c in headers), None)
            if found is None:
                raise CheckpointError(
                    f"packed tensor '{key}' is missing from the checkpoint "
                    f"({', '.join(os.path.basename(f) for f in files)}); the checkpoint is incomplete: save it again"
                )
            shape, dtype = found
            expected_dtype = buffer.dtype
            if buffer_name == "bias":
                if shape != tuple(buffer.shape):
                    raise CheckpointError(f"tensor '{key}' has shape {shape}; expected {tuple(buffer.shape)}")
                continue
            if shape != tuple(buffer.shape) or _SAFETENSORS_DTYPES.get(dtype) != expected_dtype:
                raise CheckpointError(
                    f"packed tensor '{key}' has shape {shape} and dtype {dtype} in the checkpoint; expected "
                    f"{tuple(buffer.shape)} and {expected_dtype} (corrupted checkpoint, or a config.json from another "
                    "quantization run)"
                )


def validate_loaded(model: nn.Module) -> None:
    """Validate every loaded ``SpQRLinear`` (permutation, CSR pointers, shapes), naming the layer."""
    for name, module in model.named_modules():
        if isinstance(module, SpQRLinear):
            if any(b.device.type == "meta" for b in module.buffers()):
                continue  # offloaded to disk / another device by accelerate: checked when used
            try:
                module.packed.validate()
            except ValueError as err:
                raise CheckpointError(f"{name}: {err}") from None


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``SpQRLinear`` by the dense layer it reconstructs (``Conv1D`` where it was one)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, SpQRLinear):
            continue
        weight = module.dequantize()
        target_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
        device = module.qweight.device
        if getattr(module, "source_type", "Linear") == "Conv1D":
            dense = Conv1D(module.out_features, module.in_features)
            dense.weight = nn.Parameter(weight.t().contiguous().to(device=device, dtype=target_dtype))
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            dense.weight = nn.Parameter(weight.to(device=device, dtype=target_dtype))
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(dtype=target_dtype))
        elif isinstance(dense, Conv1D):
            raise CheckpointError(f"{name}: a Conv1D layer without bias cannot be rebuilt")
        _set_module(model, name, dense)
    return model

