"""``SpQRHfQuantizer``: transformers' policy hooks for SpQR (quantize on load, or load packed).

Thin by design: calibration lives in :mod:`spqr_hf.calibrate`, module surgery in
:mod:`spqr_hf.hf.integration`, the model card in :mod:`spqr_hf.hf.card`. Every check that can
fail runs before weights are loaded or calibration starts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.quantizers import HfQuantizer

from spqr_hf.calibrate.blocks import find_block_list, find_linears, is_skipped
from spqr_hf.calibrate.data import get_calibration_data
from spqr_hf.calibrate.head import check_output_layer
from spqr_hf.calibrate.sequential import quantize_model
from spqr_hf.hf.card import install_save_hooks, remove_save_hooks
from spqr_hf.hf.integration import (
    check_checkpoint_tensors,
    dequantize_model,
    replace_with_spqr_placeholders,
    validate_loaded,
)
from spqr_hf.nn.linear import SpQRLinear

logger = logging.getLogger("spqr_hf")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SpQRHfQuantizer(HfQuantizer):
    """Quantize a full-precision model while loading it, or load a saved SpQR checkpoint."""

    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._windows: torch.Tensor | None = None
        self.report = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if not self.pre_quantized and isinstance(device_map, dict):
            targets = {str(v) for v in device_map.values()}
            if "disk" in targets or len(targets) > 1:
                raise ValueError(
                    "quantizing while loading needs the whole model on one device (device_map=None, 'cpu' or a "
                    f"single GPU), got a map over {sorted(targets)}; calibration moves one block at a time to "
                    "SpQRConfig(device=...) by itself. Load the saved quantized checkpoint with any device_map."
                )

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"SpQR models run in float32, bfloat16 or float16, not {dtype}: pass dtype=torch.float32 / "
                "torch.bfloat16 / torch.float16 to from_pretrained"
            )
        return dtype

    def update_device_map(self, device_map: Any) -> Any:
        return device_map

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False  # calibration quantizes whole blocks after loading, never one tensor at a time

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if getattr(type(model), "main_input_name", "input_ids") != "input_ids":
            raise ValueError(
                f"SpQR calibration quantizes text models (main input 'input_ids'); {type(model).__name__} takes "
                f"'{type(model).main_input_name}'"
            )
        config = self.quantization_config
        if self.pre_quantized:
            names = replace_with_spqr_placeholders(model, config)
            check_checkpoint_tensors(model, kwargs.get("checkpoint_files"), names)
            return model
        _check_something_to_quantize(model, config)  # fail before loading weights
        if config.quantize_lm_head:
            check_output_layer(model, config.modules_to_not_convert)
        tokenizer = config.tokenizer or getattr(model.config, "name_or_path", None) or None
        if config.tokenizer is None and isinstance(tokenizer, str):
            config.tokenizer = tokenizer
        with torch.device("cpu"):  # the model is being built under a meta-device context
            self._windows = get_calibration_data(config.dataset, tokenizer, config.nsamples, config.seqlen, config.seed)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.pre_quantized:
            validate_loaded(model)
        else:
            windows, self._windows = self._windows, None
            self.report = quantize_model(model, self.quantization_config, windows)
        install_save_hooks(model)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[None, dict[str, str]]:
        """Runs first in save_pretrained: refuse to write a model whose packed layers are inconsistent."""
        validate_loaded(model)
        return None, {}

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        model = dequantize_model(model, dtype)
        remove_save_hooks(model)
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _check_something_to_quantize(model: Any, config: Any) -> None:
    block_name, blocks = find_block_list(model, config.block_name_to_quantize)
    skip = config.modules_to_not_convert
    for index, block in enumerate(blocks):
        if any(not is_skipped(f"{block_name}.{index}.{name}", skip) for name in find_linears(block)):
            return
    raise ValueError(
        f"no linear layer inside {block_name} would be quantized (modules_to_not_convert={skip} skips them all, "
        "or the blocks hold no nn.Linear / Conv1D)"
    )


def count_spqr_layers(model: Any) -> int:
    """Number of ``SpQRLinear`` modules in ``model``."""
    return sum(isinstance(m, SpQRLinear) for m in model.modules())
