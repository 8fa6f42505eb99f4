"""Perplexity evaluation and the fixed "wiki-smol" protocol, so figures compare across runs.

wiki-smol: the 106 Wikipedia articles of :mod:`spqr_hf.assets`, split by article in file order;
the first 70 are the calibration pool, the other 36 the evaluation set. Each part is tokenized
as one string without special tokens. Calibration: 128 windows of 512 tokens at
``random.seed(0)``, ``start = random.randint(0, N - 512 - 1)``. Evaluation: exp(mean next-token
NLL) over the first 16 non-overlapping 2048-token windows, float32, each window independently.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

CALIBRATION_ARTICLES = 70


@dataclass
class TokenizedSplit:
    """Token ids of the calibration pool and of the evaluation set."""

    calibration: torch.Tensor
    evaluation: torch.Tensor


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one sequence, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def wiki_smol_split(tokenizer, articles: list[tuple[str, str]] | None = None) -> TokenizedSplit:
    """The protocol's calibration / evaluation token streams (articles fetched if not given).

    With the default articles the token ids are cached per tokenizer (tokenizing 670k tokens at
    once briefly takes ~300 MB, which would otherwise count in every run's peak memory).
    """
    cached = None
    if articles is None:
        from spqr_hf.assets import cache_dir, wikipedia_articles

        cached = cache_dir() / f"wiki-smol-{_tokenizer_digest(tokenizer)}.safetensors"
        if cached.exists():
            tensors = safetensors.torch.load_file(str(cached))
            return TokenizedSplit(tensors["calibration"], tensors["evaluation"])
        articles = wikipedia_articles()
    if len(articles) <= CALIBRATION_ARTICLES:
        raise ValueError(f"wiki-smol needs more than {CALIBRATION_ARTICLES} articles, got {len(articles)}")
    calibration = "\n".join(text for _, text in articles[:CALIBRATION_ARTICLES])
    evaluation = "\n".join(text for _, text in articles[CALIBRATION_ARTICLES:])
    split = TokenizedSplit(tokenize_text(tokenizer, calibration), tokenize_text(tokenizer, evaluation))
    if cached is not None:
        partial = cached.with_suffix(".partial")
        safetensors.torch.save_file({"calibration": split.calibration, "evaluation": split.evaluation}, str(partial))
        os.replace(partial, cached)
    return split


def _tokenizer_digest(tokenizer) -> str:
    """Identifies a tokenizer by its full definition (vocabulary, merges, normalisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(definition.encode("utf-8")).hexdigest()[:16]


def calibration_windows(ids: torch.Tensor, nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` random windows of ``ids`` (the protocol's sampling, reproducible)."""
    if ids.numel() < seqlen + 2:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than {seqlen + 1} for seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, windows: int | None = 16, progress: bool = True
) -> float:
    """exp(mean next-token NLL) over the first ``windows`` non-overlapping windows of ``seqlen``.

    Each window is scored on its own (no context carried over); ``windows=None`` uses them all.
    """
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    count = available if windows is None else min(windows, available)
    device = next(model.parameters(), next(model.buffers())).device
    total_nll, total_tokens = 0.0, 0
    for w in tqdm(range(count), desc="perplexity", disable=not progress):
        window = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += seqlen - 1
    return math.exp(total_nll / total_tokens)
