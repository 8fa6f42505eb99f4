"""A quantized model in use: generate (KV cache, left-padded batches), pipeline, dequantize,
model card, push_to_hub (upload intercepted), and saves that never leave a loadable half."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import spqr_hf  # noqa: F401  (registers "spqr")
from spqr_hf import SpQRConfig, SpQRLinear
from spqr_hf.hf.tiny import save_tiny_model, synthetic_text


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(model, tokenizer, source folder) for one tiny Llama quantized on load."""
    source = save_tiny_model(tmp_path_factory.mktemp("fp") / "llama", "llama", seed=11)
    config = SpQRConfig(bits=4, dataset=synthetic_text(150, seed=2), nsamples=4, seqlen=64)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    return model, AutoTokenizer.from_pretrained(source), source


def test_generate_with_kv_cache_matches_no_cache(quantized):
    model, tok, _ = quantized
    ids = tok(["The engineer measures"], return_tensors="pt")
    with_cache = model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape[1] == ids.input_ids.shape[1] + 8
    assert torch.equal(with_cache, without)


def test_batched_left_padding(quantized):
    model, tok, _ = quantized
    tok.padding_side = "left"
    prompts = ["A quiet student", "The old library remembers the ancient song"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any(), "the prompts must need padding"
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, batch.input_ids.shape[1] + 5)
    with torch.no_grad():
        padded = model(**batch).logits[0, -1]
        alone = model(**tok(prompts[:1], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_text_generation_pipeline(quantized):
    model, tok, _ = quantized
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    result = generator("The river crosses", max_new_tokens=6, do_sample=False)
    assert result[0]["generated_text"].startswith("The river crosses")


def test_model_card_section(quantized, tmp_path):
    model, _, _ = quantized
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    summary = model.config.quantization_config.quantization_summary
    assert "SpQR" in card and "import spqr_hf" in card
    assert str(summary["avg_bits_formula"]) in card and "outlier fraction" in card
    model.save_pretrained(tmp_path)  # saving again replaces the section instead of appending a second one
    assert (tmp_path / "README.md").read_text().count("## SpQR quantization") == 1


def test_push_to_hub_uploads_exactly_what_save_pretrained_writes(quantized, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError
    from transformers.utils import hub

    model, _, _ = quantized
    uploaded: dict[str, bytes] = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": f"user/{repo_id}"})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as handle:
                    uploaded[op.path_in_repo] = handle.read()
            return "commit"

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no card")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(ModelCard, "load", no_card)
    model.push_to_hub("tiny-spqr", max_shard_size="60KB")
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    written = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert set(uploaded) == set(written) and "README.md" in uploaded
    for name, data in written.items():
        assert uploaded[name] == data, name


def test_dequantize_returns_plain_model(tmp_path):
    source = save_tiny_model(tmp_path / "fp", "gpt2", seed=4)
    tok = AutoTokenizer.from_pretrained(source)
    config = SpQRConfig(bits=3, dataset=synthetic_text(150, seed=3), nsamples=4, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    ids = tok(["Three letters near the harbour"], return_tensors="pt").input_ids
    with torch.no_grad():
        quantized_logits = model(ids).logits
    plain = model.dequantize()
    assert not any(isinstance(m, SpQRLinear) for m in plain.modules())
    assert getattr(plain, "hf_quantizer", None) is None and not hasattr(plain.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, quantized_logits, rtol=1e-4, atol=1e-4)
    plain.save_pretrained(tmp_path / "dense")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, quantized_logits, rtol=1e-4, atol=1e-4)


def test_interrupted_save_leaves_nothing_that_loads(quantized, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    model, _, _ = quantized
    real_save = modeling_utils.safe_save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # write one shard, then crash on the next
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", failing_save)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target, max_shard_size="40KB")
    assert not (target / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spqr_hf-save-")], "staging folder removed"
