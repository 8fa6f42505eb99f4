"""The decode step's linear layers alone: all 154 projections of a TinyLlama-shaped model, called in
model order with one bfloat16 token, as SpQR layers (the setting of benchmarks/decode.py) and as
dense bfloat16 ``nn.Linear`` layers, side by side.

Every layer is its own copy, so each call reads its weights from memory as in real decoding (the
SpQR set is about 480 MB, the dense one 1.9 GB); the two sets are swept in turn ``--rounds`` times.
Without the ~19 ms per token of attention, norms, lm_head and Python that decode.py's models share,
these figures move ~1-2% between runs where decode.py's move 3-5%: kernel changes are judged with
them (f05b510 slowed cold layers by a third while a warm single-layer loop showed nothing). The
per-shape warm rows repeat the same calls on one SpQR layer (cache-resident as far as it fits):
the difference to the sweep is the cost of memory.

    python benchmarks/projections.py [--repeats 15] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decode import PROJECTIONS, spqr_copy, tinyllama_config
from kernel_speed import random_packed
from spqr_hf.nn.linear import SpQRLinear
from spqr_hf.ops import _extension


def layer_shapes() -> list[tuple[int, int]]:
    """(out, in) of each projection of one decoder layer, in call order."""
    c = tinyllama_config()
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    h, i = c.hidden_size, c.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return [shapes[path.split(".")[1]] for path in PROJECTIONS]


def spqr_layers() -> list[SpQRLinear]:
    """Every decoder layer's projections as SpQR layers: one random packed layer per shape, copied."""
    templates = {shape: random_packed(*shape, seed=k) for k, shape in enumerate(dict.fromkeys(layer_shapes()))}
    layers = []
    for _ in range(tinyllama_config().num_hidden_layers):
        for shape in layer_shapes():
            layers.append(spqr_copy(templates[shape]))
    return layers


def dense_layers() -> list[torch.nn.Linear]:
    """The same projections as dense bfloat16 layers with random weights."""
    layers = []
    for _ in range(tinyllama_config().num_hidden_layers):
        for out_features, in_features in layer_shapes():
            layer = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
            weight = (torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16)
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            layers.append(layer)
    return layers


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="sweeps per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="SpQR and dense swept in turn this many times")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _extension.native_available():
        raise SystemExit(f"spqr_hf._C did not load ({_extension.load_error()}); build it with pip install -e .")
    torch.manual_seed(0)
    sets = {"SpQR": spqr_layers(), "dense bfloat16": dense_layers()}
    tokens = {n: torch.randn(1, 1, n).to(torch.bfloat16) for n in {shape[1] for shape in layer_shapes()}}
    weights = sum(out_features * in_features for out_features, in_features in layer_shapes())
    weights *= tinyllama_config().num_hidden_layers

    def sweep(layers: list[torch.nn.Module]) -> None:
        for layer in layers:
            layer(tokens[layer.in_features])

    print(f"threads={torch.get_num_threads()}  cpu_isa={_extension.cpu_isa()}  {len(sets['SpQR'])} layers, "
          f"{weights / 1e6:.0f} M weights")
    print(f"{'round':>6}  {'SpQR ms/token':>13}  {'dense bf16 ms/token':>19}  {'SpQR speed-up':>13}")
    ms = {name: [] for name in sets}
    with torch.inference_mode():
        for layers in sets.values():  # warm-up sweep
            sweep(layers)
        for r in range(args.rounds):
            for name, layers in sets.items():
                ms[name].append(median_seconds(lambda: sweep(layers), args.repeats) * 1e3)  # noqa: B023
            spqr, dense = ms["SpQR"][-1], ms["dense bfloat16"][-1]
            print(f"{r + 1:>6}  {spqr:>13.2f}  {dense:>19.2f}  {dense / spqr:>12.2f}x")
        spqr, dense = statistics.median(ms["SpQR"]), statistics.median(ms["dense bfloat16"])
        print(f"{'median':>6}  {spqr:>13.2f}  {dense:>19.2f}  {dense / spqr:>12.2f}x   "
              f"(SpQR {weights / spqr / 1e6:.1f} Gweights/s)")
        warm_total = 0.0
        for layer in sets["SpQR"][:len(layer_shapes())]:
            x = tokens[layer.in_features]
            for _ in range(5):
                layer(x)
            warm = median_seconds(lambda: layer(x), 50)  # noqa: B023 (called right here)
            warm_total += warm * tinyllama_config().num_hidden_layers
            print(f"  SpQR warm {layer.out_features:>5} x {layer.in_features:<5} {warm * 1e6:8.0f} us")
        print(f"sum of warm SpQR layers: {warm_total * 1e3:.1f} ms per token")


if __name__ == "__main__":
    main()
