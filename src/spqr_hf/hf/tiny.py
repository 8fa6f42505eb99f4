"""Tiny randomly initialised causal LMs, a tokenizer and text, all built locally.

For tests, the quickstart and CLI smoke runs on machines that cannot download anything: every
architecture the calibration driver supports can be exercised in seconds.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

_SUBJECTS = ["the model", "a small robot", "the river", "my neighbour", "the old library", "a quiet student",
             "the committee", "an engineer", "the orchestra", "a curious cat", "the city council", "the farmer"]
_VERBS = ["explains", "builds", "crosses", "remembers", "describes", "repairs", "measures", "paints",
          "follows", "questions", "collects", "announces"]
_OBJECTS = ["a long bridge", "the winter garden", "several maps", "the ancient song", "new rules",
            "the broken clock", "a careful plan", "three letters", "the mountain road", "a bright lamp",
            "the weekly market", "an unusual theory"]
_TAILS = ["before sunrise.", "with great patience.", "in the northern valley.", "after the storm.",
          "for the first time.", "without any help.", "during the festival.", "near the harbour.",
          "because it was necessary.", "while everyone watched."]

# name -> (config class name, kwargs); hidden 64, 2 layers, 4 heads: seconds to calibrate.
_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=256)),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, bias=True)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)),
}

TINY_ARCHITECTURES = tuple(_ARCHITECTURES)


def synthetic_text(num_sentences: int = 400, seed: int = 0) -> list[str]:
    """English-like sentences from a small grammar: varied enough for calibration smoke runs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_SUBJECTS).capitalize(), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        lines.append(" ".join(words))
    return lines


def tiny_tokenizer(vocab_size: int = 320, seed: int = 0):
    """A byte-level BPE tokenizer trained on :func:`synthetic_text` (encodes any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_text(2000, seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=256)


def tiny_config(arch: str = "llama", vocab_size: int = 320, **overrides: Any):
    """A ``PretrainedConfig`` of a 2-layer, width-64 model of architecture ``arch``."""
    import transformers

    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHITECTURES)}")
    class_name, kwargs = _ARCHITECTURES[arch]
    kwargs = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, **kwargs, **overrides}
    kwargs.setdefault("pad_token_id", 0)
    return getattr(transformers, class_name)(**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A randomly initialised ``AutoModelForCausalLM`` of :func:`tiny_config` (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    return model.eval()


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", seed: int = 0, **overrides: Any) -> str:
    """Write a tiny model and its tokenizer to ``path`` (a folder ``from_pretrained`` can read)."""
    path = os.fspath(path)
    tiny_model(arch, seed=seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
