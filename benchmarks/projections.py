"""The decode step's linear layers alone: all 154 projections of a TinyLlama-shaped model, called in
model order with one bfloat16 token, as SpQR layers (the setting of benchmarks/decode.py).

Every layer is its own copy, so each call reads its weights from memory as in real decoding (the
whole set is about 480 MB), and the per-shape warm rows show the same calls repeated on one layer
(cache-resident as far as it fits). The difference between the two is the cost of memory.

    python benchmarks/projections.py [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decode import PROJECTIONS, tinyllama_config
from kernels import random_packed
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


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _extension.native_available():
        raise SystemExit(f"spqr_hf._C did not load ({_extension.load_error()}); build it with pip install -e .")
    torch.manual_seed(0)
    templates = {shape: random_packed(*shape, seed=k) for k, shape in enumerate(dict.fromkeys(layer_shapes()))}
    layers = []
    for _ in range(tinyllama_config().num_hidden_layers):
        for shape in layer_shapes():
            packed = templates[shape]
            layers.append(SpQRLinear.from_packed(type(packed)(**{
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in packed.__dict__.items()})))
    tokens = {n: torch.randn(1, 1, n).to(torch.bfloat16) for n in {shape[1] for shape in layer_shapes()}}
    weights = sum(layer.in_features * layer.out_features for layer in layers)

    def sweep() -> None:
        for layer in layers:
            layer(tokens[layer.in_features])

    with torch.inference_mode():
        for _ in range(3):
            sweep()
        cold = median_seconds(sweep, args.repeats)
        print(f"threads={torch.get_num_threads()}  cpu_isa={_extension.cpu_isa()}  {len(layers)} layers, "
              f"{weights / 1e6:.0f} M weights")
        print(f"all layers in model order: {cold * 1e3:.1f} ms per token ({weights / cold / 1e9:.1f} Gweights/s)")
        warm_total = 0.0
        for layer in layers[:len(layer_shapes())]:
            x = tokens[layer.in_features]
            for _ in range(5):
                layer(x)
            warm = median_seconds(lambda: layer(x), 50)  # noqa: B023 (called right here)
            warm_total += warm * tinyllama_config().num_hidden_layers
            print(f"  warm {layer.out_features:>5} x {layer.in_features:<5} {warm * 1e6:8.0f} us")
        print(f"sum of warm layers: {warm_total * 1e3:.1f} ms per token")


if __name__ == "__main__":
    main()
