"""Bad input fails early with an error that says what to do; nothing half-written loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import spqr_hf  # noqa: F401  (registers "spqr")
from spqr_hf import CalibrationDataError, CheckpointError, SpQRConfig
from spqr_hf.calibrate import NoDecoderBlocksError, find_block_list
from spqr_hf.hf.tiny import save_tiny_model, synthetic_text


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("fp") / "llama", "llama", seed=7)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, fp_dir) -> str:
    config = SpQRConfig(bits=3, dataset=synthetic_text(100), nsamples=4, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
    out = tmp_path_factory.mktemp("q") / "q"
    model.save_pretrained(out)
    return str(out)


def _fail_if_calibrating(monkeypatch):
    import spqr_hf.hf.quantizer as quantizer

    def boom(*args, **kwargs):
        raise AssertionError("calibration must not start on bad input")

    monkeypatch.setattr(quantizer, "quantize_model", boom)


@pytest.mark.parametrize("dataset, match", [
    (["too short"], "enough for 0 windows"),
    ([], "empty"),
    (["   ", ""], "empty"),
    ("/nonexistent/calibration.txt", "neither an existing file"),
    (torch.randint(3, 300, (2, 16)), "need at least"),
    (torch.rand(4, 64), "integer token ids"),
    ([1.5, "text"], "only strings"),
])
def test_bad_calibration_data(fp_dir, monkeypatch, dataset, match):
    _fail_if_calibrating(monkeypatch)
    config = SpQRConfig(dataset=dataset, nsamples=4, seqlen=64)
    with pytest.raises(CalibrationDataError, match=match):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)


def test_missing_dataset_says_how(fp_dir, monkeypatch):
    _fail_if_calibrating(monkeypatch)
    with pytest.raises(CalibrationDataError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=SpQRConfig(nsamples=4, seqlen=64))


def test_dataset_name_offline_says_how_to_pass_local_text(fp_dir, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fail_if_calibrating(monkeypatch)
    with pytest.raises(CalibrationDataError, match="network access.*Pass local text"):
        AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=SpQRConfig(dataset="wikitext2", nsamples=4, seqlen=64))


def test_model_without_decoder_blocks(fp_dir, monkeypatch):
    _fail_if_calibrating(monkeypatch)
    with pytest.raises(NoDecoderBlocksError, match="block_name_to_quantize"):
        find_block_list(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    config = SpQRConfig(dataset=synthetic_text(100), nsamples=4, seqlen=32, block_name_to_quantize="model.blocks")
    with pytest.raises(NoDecoderBlocksError, match="print\\(model\\)"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)


def test_everything_skipped(fp_dir, monkeypatch):
    _fail_if_calibrating(monkeypatch)
    config = SpQRConfig(dataset=synthetic_text(100), nsamples=4, seqlen=32, modules_to_not_convert=["self_attn", "mlp"])
    with pytest.raises(ValueError, match="no linear layer"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)


def test_non_text_model(tmp_path, monkeypatch):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    _fail_if_calibrating(monkeypatch)
    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=16))
    vit.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text models"):
        AutoModelForImageClassification.from_pretrained(
            tmp_path, quantization_config=SpQRConfig(dataset=["x"], nsamples=1, seqlen=4))


def test_unsupported_dtype(fp_dir, monkeypatch):
    _fail_if_calibrating(monkeypatch)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float64,
                                             quantization_config=SpQRConfig(dataset=["x"], nsamples=1, seqlen=4))


def _copy_checkpoint(src: str, dst) -> dict:
    import shutil

    shutil.copytree(src, dst)
    return load_file(dst / "model.safetensors")


def test_missing_packed_tensor_is_named(saved_dir, tmp_path):
    tensors = _copy_checkpoint(saved_dir, tmp_path / "c")
    del tensors["model.layers.1.mlp.up_proj.qweight"]
    save_file(tensors, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.qweight' is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_wrong_shape_is_named(saved_dir, tmp_path):
    tensors = _copy_checkpoint(saved_dir, tmp_path / "c")
    name = "model.layers.0.self_attn.q_proj.outlier_delta"
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="outlier_delta' has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_truncated_file(saved_dir, tmp_path):
    _copy_checkpoint(saved_dir, tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_corrupted_permutation_is_named(saved_dir, tmp_path):
    tensors = _copy_checkpoint(saved_dir, tmp_path / "c")
    name = "model.layers.0.mlp.down_proj.perm"
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj.*perm"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_newer_format_version(saved_dir, tmp_path):
    _copy_checkpoint(saved_dir, tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] += 1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade spqr_hf"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
