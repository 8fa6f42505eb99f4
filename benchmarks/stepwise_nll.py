"""A quantized checkpoint decoded token by token (batch 1, the decode kernels) in four settings:
bfloat16 and float32 on the plane layout (what SpQRLinear does on an AVX2 CPU; activations in one and
two table levels), bfloat16 on the row streams, and float32 on the row streams (activations represented
to 2^-31 of each group's largest value). The mean next-token NLL of each and how far their
log-probabilities are from the float32 row-stream run's.

    python benchmarks/stepwise_nll.py QUANTIZED_DIR [--text FILE] [--tokens 512]

(The text defaults to the Wikipedia sample the tests install into ~/.cache/spqr_hf; its last
40000 characters are used, which calibration windows rarely reach.)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import spqr_hf  # noqa: F401  (registers "spqr")
from spqr_hf import SpQRLinear

REFERENCE = "float32, row streams"
SETTINGS = ("bfloat16, plane layout", "bfloat16, row streams", "float32, plane layout", REFERENCE)


def stepwise_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every next token, one token per forward (with the KV cache)."""
    past, out = None, []
    with torch.inference_mode():
        for t in range(ids.shape[1] - 1):
            step = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(step.logits[0, -1].float().log_softmax(-1))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--text", default=os.path.expanduser("~/.cache/spqr_hf/wikipedia-106.txt"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()[-40000:]
    ids = AutoTokenizer.from_pretrained(args.model)(text, return_tensors="pt").input_ids[:, : args.tokens + 1]
    targets = ids[0, 1:]
    log_probs = {}
    for setting in SETTINGS:
        dtype = torch.float32 if setting.startswith("float32") else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        if "row" in setting:
            for module in model.modules():
                if isinstance(module, SpQRLinear):
                    module._layout_chosen = True  # keep the row streams
        start = time.perf_counter()
        log_probs[setting] = stepwise_log_probs(model, ids)
        layouts = sorted({"planes" if m.qweight.dtype == torch.uint8 else "rows"
                          for m in model.modules() if isinstance(m, SpQRLinear)})
        nll = -log_probs[setting].gather(1, targets[:, None]).mean()
        print(f"{setting:>24}: mean NLL {nll:.4f} (perplexity {nll.exp():.3f}) over {len(targets)} tokens, "
              f"{time.perf_counter() - start:.1f} s, layouts {layouts}")
    reference = log_probs[REFERENCE]
    for setting in SETTINGS[:-1]:
        diff = (log_probs[setting] - reference).abs()
        agree = (log_probs[setting].argmax(-1) == reference.argmax(-1)).float().mean()
        print(f"{setting:>24} vs {REFERENCE}: |d log p| max {diff.max():.4g} mean {diff.mean():.3g}, "
              f"top-1 agreement {agree:.3f}")


if __name__ == "__main__":
    main()
