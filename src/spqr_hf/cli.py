"""``spqr-hf`` command line: ``quantize`` a model, ``generate`` with it, ``eval`` its perplexity.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that sets ``handler``;
adding a subcommand (e.g. ``eval``) means writing one more and listing it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("spqr_hf")

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "auto": "auto"}


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, _DTYPES[name])


def _threshold(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError("the outlier threshold must be a positive number or 'inf'")
    return value


def _group(text: str) -> int:
    return -1 if text in ("row", "-1", "none") else int(text)


def add_quantize_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model with SpQR and save it",
                              description="Load MODEL, calibrate on --dataset, quantize with SpQR, save to OUT.")
    p.add_argument("model", help="model folder or hub id (full precision)")
    p.add_argument("out", help="folder to write the quantized checkpoint to")
    p.add_argument("--dataset", required=True,
                   help="calibration data: a .txt/.jsonl file or folder, or wikitext2 / c4 / redpajama (online)")
    p.add_argument("--tokenizer", help="tokenizer name or folder (default: the model's)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--groupsize", type=_group, default=16, help="first-level group (beta1), or 'row'")
    p.add_argument("--qq-groupsize", type=_group, default=16, help="statistics group (beta2), or 'row'")
    p.add_argument("--qq-scale-bits", type=int, default=3, help="bits of the scale statistics (16 = float16)")
    p.add_argument("--qq-zero-bits", type=int, default=3, help="bits of the zero statistics (16 = float16)")
    p.add_argument("--outlier-threshold", type=_threshold, default=0.2, help="tau; higher = fewer outliers; inf = none")
    p.add_argument("--damp-percent", type=float, default=1.0)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration windows per forward pass (default: ~8192 tokens)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the output layer (off by default, as in the paper)")
    p.add_argument("--skip", nargs="*", default=None, metavar="MODULE", help="modules to keep in full precision")
    p.add_argument("--block-name", help="path of the decoder block list, for architectures not found automatically")
    p.add_argument("--device", help="calibration device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto", help="dtype to load the model in")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--report", help="also write the per-layer report as JSON to this file")
    p.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spqr_hf import SpQRConfig

    config = SpQRConfig(
        bits=args.bits, groupsize=args.groupsize, qq_groupsize=args.qq_groupsize, qq_scale_bits=args.qq_scale_bits,
        qq_zero_bits=args.qq_zero_bits, outlier_threshold=args.outlier_threshold, damp_percent=args.damp_percent,
        act_order=args.act_order, dataset=args.dataset, tokenizer=args.tokenizer or args.model,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, modules_to_not_convert=args.skip,
        quantize_lm_head=args.quantize_lm_head,
        true_sequential=args.true_sequential, block_name_to_quantize=args.block_name, device=args.device,
        batch_size=args.batch_size,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=_dtype(args.dtype))
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    try:
        AutoTokenizer.from_pretrained(args.tokenizer or args.model).save_pretrained(args.out)
    except Exception as err:  # noqa: BLE001 - the model is saved; a missing tokenizer is not fatal
        logger.warning("could not copy the tokenizer to %s: %s", args.out, err)
    report = model.hf_quantizer.report
    if args.report:
        with open(args.report, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    print(report.summary_line())
    print(f"saved to {args.out}")
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with a (quantized) model",
                              description="Load a saved SpQR checkpoint and continue PROMPT.")
    p.add_argument("model", help="quantized model folder or hub id")
    p.add_argument("prompt", nargs="+", help="one or more prompts (generated together, left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_dtype(args.dtype), device_map=device)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(device)
    settings = {"do_sample": True, "temperature": args.temperature} if args.sample else {"do_sample": False}
    out = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **settings)
    for text in tokenizer.batch_decode(out, skip_special_tokens=True):
        print(text)
    return 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a model (quantized or not) on a text file",
                              description="exp(mean next-token NLL) over non-overlapping windows of --text.")
    p.add_argument("model", help="model folder or hub id (an SpQR checkpoint or any causal LM)")
    p.add_argument("--text", help="UTF-8 text file to score; default: the wiki-smol evaluation articles "
                                  "(fetched from the package registry once, see spqr_hf.assets)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (each scored independently)")
    p.add_argument("--windows", type=int, default=16, help="number of windows (0 = all)")
    p.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spqr_hf.evaluation import perplexity, tokenize_text, wiki_smol_split

    if args.seqlen < 2 or args.windows < 0:
        raise ValueError("--seqlen must be at least 2 and --windows at least 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.text:
        with open(args.text, encoding="utf-8") as handle:
            ids = tokenize_text(tokenizer, handle.read())
        source = args.text
    else:
        ids = wiki_smol_split(tokenizer).evaluation
        source = "wiki-smol evaluation articles"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_dtype(args.dtype), device_map=device).eval()
    ppl = perplexity(model, ids, seqlen=args.seqlen, windows=args.windows or None, progress=not args.json)
    count = min(args.windows or ids.numel() // args.seqlen, ids.numel() // args.seqlen)
    if args.json:
        print(json.dumps({"model": args.model, "text": source, "seqlen": args.seqlen, "windows": count,
                          "perplexity": ppl}))
    else:
        print(f"perplexity {ppl:.4f} ({count} windows of {args.seqlen} tokens from {source})")
    return 0


SUBCOMMANDS: list[Callable] = [add_quantize_parser, add_generate_parser, add_eval_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spqr-hf", description="SpQR quantization for Hugging Face transformers")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    import spqr_hf  # noqa: F401  (registers the "spqr" loader)
    from spqr_hf.calibrate import CalibrationDataError, NoDecoderBlocksError
    from spqr_hf.hf import CheckpointError

    try:
        return args.handler(args)
    except (CalibrationDataError, NoDecoderBlocksError, CheckpointError, ValueError, OSError) as err:
        print(f"spqr-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
