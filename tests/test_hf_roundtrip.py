"""Quantize inside from_pretrained, save, reload: identical logits, across architectures and dtypes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import spqr_hf  # noqa: F401  (registers "spqr")
from spqr_hf import SpQRConfig, SpQRLinear
from spqr_hf.hf.tiny import save_tiny_model, synthetic_text
from spqr_hf.ops import cpu_layout

TEXT = synthetic_text(200, seed=1)


def quant_config(**overrides) -> SpQRConfig:
    settings = dict(bits=3, groupsize=16, qq_groupsize=16, dataset=TEXT, nsamples=8, seqlen=64, seed=0)
    settings.update(overrides)
    return SpQRConfig(**settings)


def prompt_ids(path: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer(["The farmer repairs the broken clock near the harbour.",
                      "A curious cat follows three letters."], return_tensors="pt", padding=True).input_ids


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("fp") / "llama", "llama", seed=3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2", "falcon"])
def test_quantize_on_load_save_reload_is_bit_exact(tmp_path, arch):
    source = save_tiny_model(tmp_path / "fp", arch, seed=5)
    ids = prompt_ids(source)
    full = AutoModelForCausalLM.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant_config())
    spqr_layers = {n: m for n, m in model.named_modules() if isinstance(m, SpQRLinear)}
    assert len(spqr_layers) >= 8, "every linear of both decoder blocks must be quantized"
    assert not any("lm_head" in n or "emb" in n for n in spqr_layers), "LM head and embeddings stay full precision"
    with torch.no_grad():
        reference, quantized = full(ids).logits, model(ids).logits
    rel = float((quantized - reference).norm() / reference.norm())
    assert 0 < rel < 0.4, f"3-bit SpQR logits drift {rel:.3f} from full precision"

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "spqr" and set(saved["quantized_layers"]) == set(spqr_layers)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        again = reloaded(ids).logits
    assert torch.equal(again, quantized), "reloaded logits must be bit-identical to the saved model's"
    for name, module in reloaded.named_modules():
        if isinstance(module, SpQRLinear):
            assert torch.equal(module.dequantize(), spqr_layers[name].dequantize()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(tmp_path, fp_dir, dtype):
    ids = prompt_ids(fp_dir)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype, quantization_config=quant_config(nsamples=4))
    assert model.dtype == dtype
    with torch.no_grad():
        before = model(ids).logits
    assert before.dtype == dtype and torch.isfinite(before).all()
    # Calls on a CPU with the plane kernels put the codes in the plane layout in memory
    # (tests/test_plane_layout.py); the checkpoint must still get the row streams.
    planes = [m for m in model.modules() if isinstance(m, SpQRLinear) and m.qweight.dtype == torch.uint8]
    assert bool(planes) == cpu_layout.kernels_available()
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)


def test_sharded_checkpoint_and_device_maps(tmp_path, fp_dir):
    ids = prompt_ids(fp_dir)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=quant_config(nsamples=4))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "q", max_shard_size="40KB")
    files = os.listdir(tmp_path / "q")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    for device_map in (None, "cpu", "auto"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=device_map)
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, before), f"device_map={device_map}"


def test_plain_transformers_refuses_our_checkpoint(tmp_path, fp_dir, monkeypatch):
    """Without the plugin, transformers' built-in "spqr" entries are active: loading must raise, not
    quietly build a model with random weights."""
    from transformers.quantizers import auto
    from transformers.quantizers.quantizer_spqr import SpQRHfQuantizer as BuiltInQuantizer
    from transformers.utils.quantization_config import SpQRConfig as BuiltInConfig

    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=quant_config(nsamples=4))
    model.save_pretrained(tmp_path / "q")
    monkeypatch.setitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "spqr", BuiltInConfig)
    monkeypatch.setitem(auto.AUTO_QUANTIZER_MAPPING, "spqr", BuiltInQuantizer)
    # Even where the built-in loader's environment checks would pass (GPU + spqr_quant installed).
    monkeypatch.setattr(BuiltInQuantizer, "validate_environment", lambda self, *a, **k: None)
    with pytest.raises((TypeError, ValueError, RuntimeError, ImportError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    # A 4-bit config is refused too (the built-in loader accepts only bits=3).
    data = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    with pytest.raises((TypeError, ValueError)):
        auto.AutoQuantizationConfig.from_dict({**data, "bits": 4})
    assert "import spqr_hf" in data["shapes"], "config.json names the fix for anyone reading it"

