"""Real-model quality matrix on the fixed wiki-smol protocol (SmolLM2-135M, Wikipedia).

Each row runs in its own subprocess (so its peak memory is its own), quantizes the float32
model with our engine through the same block-by-block driver, and scores perplexity on the
held-out articles. Writes a markdown table and a perplexity-vs-stored-bits plot.

    python benchmarks/quality.py                       # the full matrix (about an hour on 2 cores)
    python benchmarks/quality.py --quick               # 2 blocks, small calibration/eval: minutes
    python benchmarks/quality.py --rows spqr-w3 rtn-w3-g16
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS: dict[str, dict | None] = {
    "baseline": None,
    "rtn-w3-g16": dict(method="rtn", bits=3, groupsize=16, qq_scale_bits=16, qq_zero_bits=16),
    "rtn-w4-g128": dict(method="rtn", bits=4, groupsize=128, qq_scale_bits=16, qq_zero_bits=16),
    "gptq-w3-g128": dict(method="spqr", bits=3, groupsize=128, qq_scale_bits=16, qq_zero_bits=16,
                         outlier_threshold=math.inf, damp_percent=0.01),
    "gptq-w4-g128": dict(method="spqr", bits=4, groupsize=128, qq_scale_bits=16, qq_zero_bits=16,
                         outlier_threshold=math.inf, damp_percent=0.01),
    "spqr-w3": dict(method="spqr", bits=3, groupsize=16, qq_groupsize=16, outlier_threshold=0.2),
    "spqr-w4": dict(method="spqr", bits=4, groupsize=16, qq_groupsize=16, outlier_threshold=0.2),
    "spqr-w3-8x64": dict(method="spqr", bits=3, groupsize=8, qq_groupsize=64, outlier_threshold=0.2),
    # The output layer quantized too (SpQRConfig(quantize_lm_head=True)); its bits count in the averages,
    # and the row also scores the same quantized blocks with the original head ("perplexity_dense_head").
    "spqr-w3-head": dict(method="spqr", bits=3, groupsize=16, qq_groupsize=16, outlier_threshold=0.2,
                         quantize_lm_head=True),
}
REFERENCE = {  # the public reference code on the same protocol (issue 4): perplexity, formula bits
    "baseline": (18.36, 16.0), "spqr-w3": (22.40, 4.19), "spqr-w4": (19.43, 4.64),
    "gptq-w3-g128": (56.30, 3.27), "gptq-w4-g128": (22.75, 4.27),
    "rtn-w3-g16": (49.43, 5.0), "rtn-w4-g128": (28.69, 4.27),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(name: str, quick: bool) -> dict:
    """Quantize (unless baseline) and evaluate one row in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spqr_hf import SpQRConfig, assets
    from spqr_hf.calibrate.sequential import quantize_model
    from spqr_hf.core import round_to_nearest
    from spqr_hf.evaluation import calibration_windows, perplexity, wiki_smol_split
    from spqr_hf.hf.integration import dequantize_model

    folder = assets.smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    split = wiki_smol_split(tokenizer)
    spec = ROWS[name]
    # Quantize from the checkpoint's own float16 weights (half the memory of float32; the engine
    # works in float32 on a copy of each layer); score everything in float32.
    load_dtype = torch.float32 if spec is None else torch.float16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=load_dtype).eval()
    nsamples, seqlen, eval_len, eval_windows = (16, 256, 512, 4) if quick else (128, 512, 2048, 16)
    row: dict = {"row": name}
    dense_head = None  # the original output weight, when the row quantizes it
    if spec is not None:
        spec = dict(spec)
        method = spec.pop("method")
        skip = [f"model.layers.{i}" for i in range(2, model.config.num_hidden_layers)] if quick else None
        config = SpQRConfig(**spec, nsamples=nsamples, seqlen=seqlen, modules_to_not_convert=skip)
        windows = calibration_windows(split.calibration, nsamples, seqlen)
        quantizer = None
        if method == "rtn":  # no Hessian needed: calibrate on one short window only
            windows = windows[:1, :16]
            quantizer = lambda weight, hessian, params: round_to_nearest(weight, params)  # noqa: E731
        dense_head = model.get_output_embeddings().weight.detach().clone() if config.quantize_lm_head else None
        start = time.perf_counter()
        report = quantize_model(model, config, windows, layer_quantizer=quantizer, progress=False)
        row["quantize_seconds"] = time.perf_counter() - start
        row["peak_rss_mb_quantize"] = _peak_rss_mb()
        params = config.engine_params()
        weights = sum(layer.numel for layer in report.layers)
        row["formula_bits"] = sum(
            params.formula_bits(layer.outlier_fraction, layer.in_features, layer.out_features) * layer.numel
            for layer in report.layers
        ) / weights
        row["stored_bits"] = sum(layer.storage_bits for layer in report.layers) / weights
        row["outlier_fraction"] = sum(layer.nnz for layer in report.layers) / weights
        dequantize_model(model, torch.float32)  # bit-identical weights, dense matmuls for speed
        model.float()
    row["perplexity"] = perplexity(model, split.evaluation, eval_len, eval_windows, progress=False)
    if dense_head is not None:
        # The same quantized blocks with the original head put back: the head's own share of the loss.
        model.get_output_embeddings().weight.data.copy_(dense_head)
        row["perplexity_dense_head"] = perplexity(model, split.evaluation, eval_len, eval_windows, progress=False)
    return row


def markdown(rows: list[dict], quick: bool = False) -> str:
    """The results table; the reference code's figures only apply to the full protocol."""
    base = next((r["perplexity"] for r in rows if r["row"] == "baseline"), None)
    lines = [
        "| setting | perplexity | change vs baseline | avg bits (formula) | avg bits (stored) | outliers "
        "| quantize time (s) | peak RSS quantizing (MB) | reference code: perplexity / formula bits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = f"{r['perplexity'] - base:+.2f}" if base is not None else "-"
        ref = None if quick else REFERENCE.get(r["row"])
        lines.append(
            f"| {r['row']} | {r['perplexity']:.2f} | {change} | {r.get('formula_bits', 16):.3f} "
            f"| {r.get('stored_bits', 16):.3f} | {r.get('outlier_fraction', 0):.2%} "
            f"| {r.get('quantize_seconds', 0):.0f} | {r.get('peak_rss_mb_quantize', 0):.0f} "
            f"| {f'{ref[0]:.2f} / {ref[1]:.2f}' if ref else '-'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["row"] == "baseline":
            ax.axhline(r["perplexity"], color="gray", linestyle="--", label="float (unquantized)")
            continue
        marker = {"rtn": "s", "gptq": "^", "spqr": "o"}[r["row"].split("-")[0]]
        ax.scatter(r["stored_bits"], r["perplexity"], marker=marker, s=50)
        ax.annotate(r["row"], (r["stored_bits"], r["perplexity"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("average stored bits per weight (packed buffers)")
    ax.set_ylabel("wiki-smol perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs stored bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 16x256 calibration, 4x512 eval")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "quality")
    parser.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                        help="only render the table/plot from saved row files (later files override rows)")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # internal: one row, JSON out
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.quick)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.render:
        merged = {r["row"]: r for path in args.render for r in json.loads(path.read_text(encoding="utf-8"))}
        rows = [merged[name] for name in ROWS if name in merged]
    for name in [] if args.render else args.rows:
        cmd = [sys.executable, __file__, "--row", name] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"row {name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args.quick)
    suffix = "-quick" if args.quick else ""
    (args.out / f"quality{suffix}.md").write_text(table + "\n", encoding="utf-8")
    (args.out / f"quality{suffix}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    plot(rows, args.out / f"quality{suffix}.png")
    print(table)


if __name__ == "__main__":
    main()
