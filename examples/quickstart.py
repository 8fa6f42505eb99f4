"""Quantize a causal LM with SpQR while loading it, save it, reload it, and generate.

    python examples/quickstart.py                 # a tiny random Llama and local text (offline, seconds)
    python examples/quickstart.py MODEL [TEXT]    # any local model folder / hub id, optional .txt/.jsonl

The tiny default shows the workflow, not quality: its weights are random.
"""

from __future__ import annotations

import logging
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import spqr_hf  # registers SpQR with transformers
from spqr_hf.hf.tiny import save_tiny_model, synthetic_text


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = tempfile.mkdtemp(prefix="spqr_hf-quickstart-")
    model_path = sys.argv[1] if len(sys.argv) > 1 else save_tiny_model(f"{workdir}/tiny-llama", "llama")
    dataset = sys.argv[2] if len(sys.argv) > 2 else synthetic_text(400)
    tiny = len(sys.argv) == 1

    config = spqr_hf.SpQRConfig(
        bits=3, groupsize=16, qq_groupsize=16, outlier_threshold=0.2,  # the paper's ~3.6-bit setting
        dataset=dataset, tokenizer=model_path,
        nsamples=16 if tiny else 128, seqlen=128 if tiny else 512,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    out_dir = f"{workdir}/quantized"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)

    prompt = tokenizer(["The engineer explains"], return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(model(**prompt).logits, reloaded(**prompt).logits)
    generated = reloaded.generate(**prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"saved to {out_dir}; reloaded logits identical: {same}")
    print(tokenizer.decode(generated[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
