"""Validated hyperparameters of the SpQR engine (no transformers, no calibration settings)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spqr_hf.format.layout import MAX_BITS, MIN_BITS, RAW_STAT_BITS

WHOLE_ROW = -1  # groupsize / qq_groupsize value meaning "one group spans the whole dimension"
PERMUTATION_ORDERS = ("act_order", "identity")
_MIN_GROUP, _MAX_GROUP = 4, 256


def _check_group(name: str, value: int) -> None:
    ok = isinstance(value, int) and (
        value == WHOLE_ROW
        or (_MIN_GROUP <= value <= _MAX_GROUP and value & (value - 1) == 0)
    )
    if not ok:
        raise ValueError(
            f"{name}={value!r} is not supported: use a power of two from {_MIN_GROUP} to "
            f"{_MAX_GROUP}, or {WHOLE_ROW} (or None) for one group over the whole dimension"
        )


def _check_stat_bits(name: str, value: int) -> None:
    if not (isinstance(value, int) and (MIN_BITS <= value <= MAX_BITS or value == RAW_STAT_BITS)):
        raise ValueError(
            f"{name}={value!r} is not supported: use {MIN_BITS}..{MAX_BITS} for quantized "
            f"(bilevel) statistics, or {RAW_STAT_BITS} (or None) for plain float16 statistics"
        )


@dataclass(frozen=True)
class SpQRParams:
    """Engine settings, named after the SpQR paper / reference and transformers' GPTQConfig.

    ``bits`` (paper b_w), ``groupsize`` (beta1, first-level group over input columns),
    ``qq_groupsize`` (beta2, second-level group over output rows), ``qq_scale_bits`` /
    ``qq_zero_bits`` (b_s / b_z; 16 = float16 statistics without a second level),
    ``outlier_threshold`` (tau; higher = fewer outliers, ``inf`` = none), ``damp_percent``
    (lambda, relative to mean(diag H); GPTQConfig's name), ``act_order`` (GPTQConfig's
    ``desc_act``), ``blocksize`` (GPTQ lazy-update block), ``simplified_outliers`` (fit group
    statistics on all weights instead of the leave-one-out outlier-aware fit).
    """

    bits: int = 3
    groupsize: int = 16
    qq_groupsize: int = 16
    qq_scale_bits: int = 3
    qq_zero_bits: int = 3
    outlier_threshold: float = 0.2
    damp_percent: float = 1.0
    act_order: bool = True
    blocksize: int = 128
    simplified_outliers: bool = False

    def __post_init__(self) -> None:
        # Accept None as a synonym for "whole row" / "float16 statistics".
        for name, none_value in (("groupsize", WHOLE_ROW), ("qq_groupsize", WHOLE_ROW),
                                 ("qq_scale_bits", RAW_STAT_BITS), ("qq_zero_bits", RAW_STAT_BITS)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, none_value)
        if not (isinstance(self.bits, int) and MIN_BITS <= self.bits <= MAX_BITS):
            raise ValueError(f"bits={self.bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}")
        _check_group("groupsize", self.groupsize)
        _check_group("qq_groupsize", self.qq_groupsize)
        _check_stat_bits("qq_scale_bits", self.qq_scale_bits)
        _check_stat_bits("qq_zero_bits", self.qq_zero_bits)
        tau = self.outlier_threshold
        if not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
            raise ValueError(
                f"outlier_threshold={tau!r} is not supported: use a positive number "
                "(0.1-0.2 keeps about 1% outliers; float('inf') disables outliers)"
            )
        if not isinstance(self.damp_percent, (int, float)) or not 0 <= self.damp_percent < math.inf:
            raise ValueError(
                f"damp_percent={self.damp_percent!r} must be a finite number >= 0 (1.0 for SpQR, 0.01 for GPTQ)"
            )
        if not (isinstance(self.blocksize, int) and self.blocksize >= 1 and self.blocksize & (self.blocksize - 1) == 0):
            raise ValueError(f"blocksize={self.blocksize!r} must be a positive power of two (default 128)")
        if not isinstance(self.act_order, bool) or not isinstance(self.simplified_outliers, bool):
            raise ValueError("act_order and simplified_outliers must be booleans")

    @property
    def has_outliers(self) -> bool:
        return math.isfinite(self.outlier_threshold)

    def effective_groupsize(self, in_features: int) -> int:
        return in_features if self.groupsize == WHOLE_ROW else min(self.groupsize, max(in_features, 1))

    def effective_qq_groupsize(self, out_features: int) -> int:
        return out_features if self.qq_groupsize == WHOLE_ROW else min(self.qq_groupsize, max(out_features, 1))

    def formula_bits(self, outlier_fraction: float = 0.0, in_features: int | None = None,
                     out_features: int | None = None) -> float:
        """Average bits per weight by the paper's formula (appendix), for comparing layouts.

        bits + (b_s + b_z) / beta1 + 64 / (beta1 * beta2) + 32 * outlier_fraction, with float16
        statistics counted as 16 bits and no second level. Given the layer's dimensions, partial
        and whole-row groups are counted as they are (e.g. 576 columns in groups of 128 make 5).
        """
        if in_features is None or out_features is None:
            if WHOLE_ROW in (self.groupsize, self.qq_groupsize):
                raise ValueError("formula_bits needs the layer's dimensions for whole-row groups")
            in_features, out_features = self.groupsize, self.qq_groupsize
        m, n = out_features, in_features
        groups_per_row = -(-n // self.effective_groupsize(n))
        chunks = -(-m // self.effective_qq_groupsize(m))
        bits = float(self.bits)
        for stat_bits in (self.qq_scale_bits, self.qq_zero_bits):
            bits += stat_bits * groups_per_row / n  # 16 for float16 statistics
            if stat_bits != RAW_STAT_BITS:
                bits += 32 * groups_per_row * chunks / (m * n)  # float16 step and zero per chunk
        return bits + 32 * outlier_fraction
