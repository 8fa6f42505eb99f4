"""decode.py's 154 decoder projections alone, per token: SpQR kernels vs dense bfloat16, cold.

decode.py times whole models: around the projections each token spends ~19 ms on attention, norms,
lm_head and Python that both models share, and its ratio moves 3-5% between runs on a noisy host.
Here the same layers (decode.py's models, so the same shapes and packing) are called once per
"token" each, in model order, at batch 1 with bfloat16 activations and nothing between them, so they
evict each other as in decoding. Its figures move ~1-2% between runs: a kernel change is judged
with this, before and after (f05b510 made cold batch-1 layers 10-25% slower while the warm
single-layer loop it was checked with showed nothing).

    python benchmarks/decode_layers.py [--tokens 25] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decode
from spqr_hf.ops import _extension


def projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder projections in the order a forward pass calls them."""
    layers = []
    for block in model.model.layers:
        for path in decode.PROJECTIONS:
            parent_name, name = path.split(".")
            layers.append(getattr(getattr(block, parent_name), name))
    return layers


def ms_per_token(layers: list[torch.nn.Module], tokens: int) -> float:
    """Median time of one pass over every layer (one "token"), after one pass of warm-up."""
    inputs = {n: torch.randn(1, 1, n).to(torch.bfloat16) for n in {layer.in_features for layer in layers}}
    times = []
    with torch.inference_mode():
        for _ in range(tokens + 1):
            start = time.perf_counter()
            for layer in layers:
                layer(inputs[layer.in_features])
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=25, help="passes per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="SpQR and dense measured in turn this many times")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.tokens < 1 or args.rounds < 1:
        parser.error("--tokens and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _extension.native_available():
        raise SystemExit(f"spqr_hf._C did not load ({_extension.load_error()}); build it with pip install -e .")
    torch.manual_seed(0)
    spqr = projections(decode.build("SpQR 3-bit"))
    dense = projections(decode.build("dense bfloat16"))
    print(f"threads={torch.get_num_threads()}  cpu_isa={_extension.cpu_isa()}  layers={len(spqr)}  "
          f"tokens per measurement={args.tokens}")
    print(f"{'round':>6}  {'SpQR ms/token':>13}  {'dense bf16 ms/token':>19}  {'SpQR speed-up':>13}")
    ratios, spqr_ms, dense_ms = [], [], []
    for r in range(args.rounds):
        spqr_ms.append(ms_per_token(spqr, args.tokens))
        dense_ms.append(ms_per_token(dense, args.tokens))
        ratios.append(dense_ms[-1] / spqr_ms[-1])
        print(f"{r + 1:>6}  {spqr_ms[-1]:>13.2f}  {dense_ms[-1]:>19.2f}  {ratios[-1]:>12.2f}x")
    print(f"{'median':>6}  {statistics.median(spqr_ms):>13.2f}  {statistics.median(dense_ms):>19.2f}  "
          f"{statistics.median(ratios):>12.2f}x")


if __name__ == "__main__":
    main()
