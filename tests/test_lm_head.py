"""SpQRConfig(quantize_lm_head=True): the output layer's Hessian, its SpQR layer, save and reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import spqr_hf  # noqa: F401  (registers "spqr")
from spqr_hf import SpQRConfig, SpQRLinear
from spqr_hf.calibrate.blocks import find_block_list
from spqr_hf.calibrate.head import output_layer, output_layer_hessian
from spqr_hf.calibrate.replay import first_tensor
from spqr_hf.core.hessian import HessianAccumulator
from spqr_hf.hf.tiny import save_tiny_model, synthetic_text, tiny_model

TEXT = synthetic_text(200, seed=1)


def quant_config(**overrides) -> SpQRConfig:
    settings = dict(bits=3, groupsize=16, qq_groupsize=16, dataset=TEXT, nsamples=8, seqlen=64, seed=0,
                    quantize_lm_head=True)
    settings.update(overrides)
    return SpQRConfig(**settings)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "falcon"])
def test_output_layer_hessian_matches_the_plain_forward(arch):
    """Replaying the last block's outputs through the model's own tail gives the Hessian of the
    head's inputs in an ordinary forward (final norm and all), batch by batch."""
    model = tiny_model(arch, seed=2)
    block_name, blocks = find_block_list(model)
    name, head = output_layer(model)
    windows = torch.randint(3, 300, (5, 24), generator=torch.Generator().manual_seed(7))
    batch_size = 2
    expected = HessianAccumulator(head.in_features)
    last_outputs, structure = [], {}

    def keep_last(module, args, output):
        structure["tuple_len"] = len(output) if isinstance(output, (tuple, list)) else 0
        last_outputs.append(first_tensor(output).clone())

    def keep_head_input(module, args):
        expected.add_batch(args[0])

    handles = [blocks[-1].register_forward_hook(keep_last), head.register_forward_pre_hook(keep_head_input)]
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    for handle in handles:
        handle.remove()
    assert len(last_outputs) == 3 and name.endswith("lm_head")

    got = output_layer_hessian(model, block_name, blocks, windows, batch_size, last_outputs, structure["tuple_len"],
                               torch.device("cpu"))
    want = expected.hessian
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # The blocks are themselves again: a plain forward runs them (no replay left behind).
    assert all("forward" not in block.__dict__ for block in blocks)
    with torch.no_grad():
        model(input_ids=windows[:1])


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_head_saves_and_reloads_bit_exact(tmp_path, tied):
    source = save_tiny_model(tmp_path / "fp", "llama", seed=5, tie_word_embeddings=tied)
    full = AutoModelForCausalLM.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant_config())
    assert isinstance(model.lm_head, SpQRLinear)
    assert model.lm_head.out_features == 320 and model.lm_head.in_features == 64
    # The input embeddings stay as they were, also when the head used to share them.
    assert torch.equal(model.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert not model.config.tie_word_embeddings
    assert any(layer.name == "lm_head" for layer in model.hf_quantizer.report.layers)

    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, quantized = full(ids).logits, model(ids).logits
    rel = float((quantized - reference).norm() / reference.norm())
    assert 0 < rel < 0.4, f"3-bit SpQR logits (head included) drift {rel:.3f} from full precision"

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    assert saved["quantization_config"]["quantize_lm_head"] is True
    assert "lm_head" in saved["quantization_config"]["quantized_layers"]
    assert "the LM head is quantized too" in (tmp_path / "q" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, SpQRLinear)
    assert torch.equal(reloaded.lm_head.dequantize(), model.lm_head.dequantize())
    assert torch.equal(reloaded.model.embed_tokens.weight, full.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized)


def test_head_quantized_only_when_asked(tmp_path):
    source = save_tiny_model(tmp_path / "fp", "llama", seed=5)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant_config(quantize_lm_head=False))
    assert type(model.lm_head) is torch.nn.Linear
    assert "lm_head" not in model.config.quantization_config.quantized_layers


def test_head_both_quantized_and_skipped_is_refused_before_loading(tmp_path, monkeypatch):
    source = save_tiny_model(tmp_path / "fp", "llama", seed=5)
    calls = []
    monkeypatch.setattr("spqr_hf.hf.quantizer.get_calibration_data", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="skips the output layer 'lm_head': drop one"):
        AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quant_config(modules_to_not_convert=["lm_head"]))
    assert not calls, "the conflict must be reported before calibration data is prepared"


def test_quantize_lm_head_must_be_a_bool():
    with pytest.raises(ValueError, match="quantize_lm_head='yes' must be True or False"):
        quant_config(quantize_lm_head="yes")


@pytest.mark.parametrize("arch", ["gpt2", "opt", "falcon"])
def test_quantized_head_round_trip_across_architectures(tmp_path, arch):
    """Heads tied to their embeddings by default (GPT-2, OPT, Falcon): packed, untied, reloaded."""
    source = save_tiny_model(tmp_path / "fp", arch, seed=5)
    full = AutoModelForCausalLM.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant_config())
    assert isinstance(model.get_output_embeddings(), SpQRLinear)
    assert torch.equal(model.get_input_embeddings().weight, full.get_input_embeddings().weight)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        quantized = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.get_output_embeddings(), SpQRLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized)
