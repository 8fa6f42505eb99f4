"""``SpQRConfig``: the user-facing settings, validated at construction, JSON-clean.

The engine fields are validated by :class:`spqr_hf.core.params.SpQRParams` (one source of truth);
the calibration fields (dataset, tokenizer, ...) only matter for quantize-on-load.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from spqr_hf.core.params import SpQRParams
from spqr_hf.format.layout import FORMAT_VERSION

QUANT_METHOD = "spqr"
FORMAT_NAME = "spqr_hf"
_ENGINE_FIELDS = tuple(f.name for f in fields(SpQRParams))
# transformers' built-in "spqr" config raises "shapes must be a dict" on this (after checking
# bits == 3 / beta1 == 16), so a checkpoint of ours never loads as random weights without spqr_hf.
_LOADER_GUARD = {"shapes": "spqr_hf checkpoint: pip install spqr_hf and run `import spqr_hf` before from_pretrained"}


def _check_layers(layers: Any) -> dict[str, int] | None:
    if layers is None:
        return None
    if not isinstance(layers, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in layers.items()
    ):
        raise ValueError("quantized_layers must map module names to outlier counts (non-negative integers)")
    return dict(layers)


CALIBRATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_calibration_dtype(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`CALIBRATION_DTYPES`."""
    if name not in CALIBRATION_DTYPES:
        raise ValueError(f"calibration_dtype={name!r}: use one of {', '.join(map(repr, CALIBRATION_DTYPES))}")


class SpQRConfig(QuantizationConfigMixin):
    """SpQR quantization settings for ``from_pretrained(..., quantization_config=...)``.

    Engine (paper name in brackets): ``bits`` [b_w], ``groupsize`` [beta1], ``qq_groupsize``
    [beta2], ``qq_scale_bits`` / ``qq_zero_bits`` [b_s, b_z; 16 = float16 statistics, the GPTQ
    baseline], ``outlier_threshold`` [tau; higher = fewer outliers, inf = none],
    ``damp_percent`` [lambda, relative to mean diag(H)], ``act_order`` [GPTQConfig desc_act],
    ``blocksize``, ``simplified_outliers``. See :class:`~spqr_hf.core.params.SpQRParams`.

    Calibration: ``dataset`` (list of texts, a .txt/.jsonl path or folder, a ``datasets.Dataset``,
    token tensors, or a dataset name), ``tokenizer`` (object or name; never serialised),
    ``nsamples``, ``seqlen``, ``seed``, ``modules_to_not_convert``, ``true_sequential``,
    ``block_name_to_quantize``, ``device`` (calibration device; default CUDA if available, else
    CPU), ``batch_size`` (calibration windows per forward pass; default about 8192 tokens),
    ``calibration_dtype`` (dtype of the calibration forward passes: "auto" = bfloat16 on CPUs
    with native bfloat16 matmuls for float32 models, else the model's dtype; the engine always
    quantizes the original weights), ``quantize_lm_head`` (also quantize the output layer, after
    the blocks: off by default, as in the paper; a tied head gets its own packed copy and the
    saved config unties it).

    Written by quantization, read back on load: ``quantized_layers`` (module name -> number of
    outliers, which sizes that layer's sparse buffers) and ``quantization_summary`` (average
    bits, outlier fraction, wall time).
    """

    def __init__(
        self,
        bits: int = 3,
        groupsize: int | None = 16,
        qq_groupsize: int | None = 16,
        qq_scale_bits: int | None = 3,
        qq_zero_bits: int | None = 3,
        outlier_threshold: float = 0.2,
        damp_percent: float = 1.0,
        act_order: bool = True,
        blocksize: int = 128,
        simplified_outliers: bool = False,
        dataset: Any = None,
        tokenizer: Any = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        true_sequential: bool = True,
        block_name_to_quantize: str | None = None,
        device: str | None = None,
        format_version: int = FORMAT_VERSION,
        batch_size: int | None = None,
        calibration_dtype: str = "auto",
        quantize_lm_head: bool = False,
        quantized_layers: dict[str, int] | None = None,
        quantization_summary: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for key in _LOADER_GUARD:  # written for plain transformers only (see to_dict)
            kwargs.pop(key, None)
        kwargs.pop("quant_method", None)
        fmt = kwargs.pop("format", FORMAT_NAME)
        if fmt != FORMAT_NAME:
            raise ValueError(
                f"this quantization config uses the SpQR storage format {fmt!r}; the installed spqr_hf reads "
                f"only {FORMAT_NAME!r} checkpoints"
            )
        if isinstance(outlier_threshold, str):  # JSON has no infinity; we write "inf"
            outlier_threshold = float(outlier_threshold)
        params = SpQRParams(
            bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
            qq_scale_bits=qq_scale_bits, qq_zero_bits=qq_zero_bits,
            outlier_threshold=outlier_threshold, damp_percent=damp_percent,
            act_order=act_order, blocksize=blocksize, simplified_outliers=simplified_outliers,
        )
        self.quant_method = QUANT_METHOD
        self.format = FORMAT_NAME
        for name in _ENGINE_FIELDS:
            setattr(self, name, getattr(params, name))
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses spqr_hf format version {format_version}, but the installed "
                f"spqr_hf reads versions up to {FORMAT_VERSION}: upgrade spqr_hf (pip install -U spqr_hf)"
            )
        self.format_version = format_version
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.seed = seed
        self.modules_to_not_convert = modules_to_not_convert
        self.true_sequential = true_sequential
        self.block_name_to_quantize = block_name_to_quantize
        self.device = device
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (or None for automatic)")
        self.batch_size = batch_size
        check_calibration_dtype(calibration_dtype)
        self.calibration_dtype = calibration_dtype
        if not isinstance(quantize_lm_head, bool):
            raise ValueError(f"quantize_lm_head={quantize_lm_head!r} must be True or False")
        self.quantize_lm_head = quantize_lm_head
        self.quantized_layers = _check_layers(quantized_layers)
        self.quantization_summary = quantization_summary
        for key, value in kwargs.items():
            setattr(self, key, value)

    def engine_params(self) -> SpQRParams:
        """The validated engine settings this config describes."""
        return SpQRParams(**{name: getattr(self, name) for name in _ENGINE_FIELDS})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Inverse of :meth:`to_dict`; rejects the original SpQR (``spqr_quant``) layout with a clear error."""
        if "format" not in config_dict and any(k in config_dict for k in ("beta1", "beta2", "shapes")):
            raise ValueError(
                "this checkpoint was saved in the original SpQR inference layout (spqr_quant: beta1/beta2/shapes), "
                "which spqr_hf cannot load yet; re-quantize the full-precision model with spqr_hf "
                "(from_pretrained(..., quantization_config=SpQRConfig(...)))"
            )
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-clean dict: no tokenizer object, no raw dataset, infinity written as "inf".

        Also carries ``shapes`` (a string) so that plain transformers, whose built-in loader owns
        the name "spqr", refuses the checkpoint loudly instead of loading random weights; it names
        the fix (``import spqr_hf``) for anyone reading config.json."""
        out = {}
        for key, value in self.__dict__.items():
            if key == "tokenizer":
                value = value if isinstance(value, str) else (getattr(value, "name_or_path", None) or None)
            elif key == "device" and value is not None:
                value = str(value)
            elif key == "dataset":
                value = value if isinstance(value, str) else None
            elif key == "quantized_layers" and value is not None:
                value = dict(value)
            elif isinstance(value, float) and math.isinf(value):
                value = "inf"
            out[key] = value
        out.update(_LOADER_GUARD)
        return out
