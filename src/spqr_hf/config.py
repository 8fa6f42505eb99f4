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
    ``block_name_to_quantize``, ``device``.
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
        **kwargs: Any,
    ) -> None:
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
        for key, value in kwargs.items():
            setattr(self, key, value)

    def engine_params(self) -> SpQRParams:
        """The validated engine settings this config describes."""
        return SpQRParams(**{name: getattr(self, name) for name in _ENGINE_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-clean dict: no tokenizer object, no raw dataset, infinity written as "inf"."""
        out = {}
        for key, value in self.__dict__.items():
            if key == "tokenizer":
                value = value if isinstance(value, str) else getattr(value, "name_or_path", None)
            elif key == "dataset":
                value = value if isinstance(value, str) else None
            elif isinstance(value, float) and math.isinf(value):
                value = "inf"
            out[key] = value
        return out
