"""SpQRConfig as transformers stores it: JSON-clean, round-trips, rejects what it cannot read."""

from __future__ import annotations

import json
import math

import pytest
import torch

import spqr_hf  # noqa: F401  (registers "spqr")
from spqr_hf import SpQRConfig
from spqr_hf.format import FORMAT_VERSION
from spqr_hf.hf.tiny import tiny_tokenizer


def test_to_dict_is_json_clean_and_round_trips():
    config = SpQRConfig(
        bits=4, groupsize=32, qq_groupsize=8, qq_scale_bits=16, qq_zero_bits=3, outlier_threshold=float("inf"),
        dataset=["some text", "more text"], tokenizer=tiny_tokenizer(), nsamples=4, seqlen=32, seed=7,
        modules_to_not_convert=["mlp.down_proj"], true_sequential=False, device=torch.device("cpu"),
        batch_size=2, quantized_layers={"model.layers.0.mlp.up_proj": 12},
        quantization_summary={"avg_bits_formula": 4.6, "outlier_fraction": 0.001},
    )
    data = config.to_dict()
    text = json.dumps(data)  # raises if anything is not JSON-clean
    assert data["dataset"] is None, "the raw dataset must never reach config.json"
    assert data["tokenizer"] is None or isinstance(data["tokenizer"], str)
    assert data["outlier_threshold"] == "inf" and data["device"] == "cpu"
    assert data["quant_method"] == "spqr" and data["format"] == "spqr_hf" and data["format_version"] == FORMAT_VERSION
    again = SpQRConfig.from_dict(json.loads(text))
    assert math.isinf(again.outlier_threshold)
    assert again.to_dict() == data
    assert again.quantized_layers == {"model.layers.0.mlp.up_proj": 12}
    assert again.engine_params() == config.engine_params()


def test_dataset_path_survives_round_trip():
    data = SpQRConfig(dataset="calib.txt", tokenizer="some/tokenizer").to_dict()
    assert data["dataset"] == "calib.txt" and data["tokenizer"] == "some/tokenizer"


def test_newer_format_version_is_refused():
    data = SpQRConfig().to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="upgrade spqr_hf"):
        SpQRConfig.from_dict(data)


def test_original_spqr_layout_is_refused_clearly():
    with pytest.raises(ValueError, match="original SpQR"):
        SpQRConfig.from_dict({"quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16, "shapes": {}})


def test_other_storage_format_is_refused():
    data = SpQRConfig().to_dict()
    data["format"] = "something_else"
    with pytest.raises(ValueError, match="storage format"):
        SpQRConfig.from_dict(data)


@pytest.mark.parametrize("bad", [{"bits": 9}, {"groupsize": 12}, {"batch_size": 0},
                                 {"quantized_layers": {"a": -1}}, {"outlier_threshold": 0}])
def test_bad_fields_raise(bad):
    with pytest.raises(ValueError):
        SpQRConfig(**bad)


def test_registration_takes_over_spqr():
    from transformers.quantizers import auto

    from spqr_hf.hf import SpQRHfQuantizer, is_registered

    assert is_registered()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["spqr"] is SpQRConfig
    assert auto.AUTO_QUANTIZER_MAPPING["spqr"] is SpQRHfQuantizer
    assert isinstance(auto.AutoQuantizationConfig.from_dict(SpQRConfig(bits=4).to_dict()), SpQRConfig)
