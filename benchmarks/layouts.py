"""The two layouts of the same codes side by side: the row streams (the checkpoint format) and the CPU
plane layout that ``SpQRLinear`` takes on AVX2 and AVX-512 CPUs (csrc/include/spqr_hf/planes.h,
csrc/cpu/plane_kernels.inc), at batch 1, with activations of one dtype (``--dtype``, bfloat16 by default;
float32 and float16 take the plane matvec's two-level path and the row streams' two-level int16 one).

Two tables: single layers with a cache flush before each call (``kernel_speed.median_ms``; kernel_speed.py's
shapes, with the dense float16 / bfloat16 matvecs), and the 154 decode projections of a TinyLlama-shaped model swept in
model order (projections.py's set). The operator is called directly, on copies in each layout;
everything is alternated in rounds, since this machine's speed drifts between runs.

With ``--batches`` the single layers also run at other batch sizes (beyond the plane matvec's batches the
plane layout's prefill path: tiles dequantised from the planes for torch's GEMM, against the row
streams' own); the projection sweep stays at batch 1.

    python benchmarks/layouts.py [--rounds 3] [--threads 2] [--dtype float32] [--batches 1 16 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from functools import partial

import torch

from kernel_speed import median_ms, random_packed
from projections import layer_shapes
from spqr_hf.ops import _extension, _schema, cpu_layout

OP = torch.ops.spqr_hf.spqr_linear.default


def single_layers(rounds: int, dtype: torch.dtype, batch: int) -> None:
    print(" shape (out x in) batch   rows ms  planes ms  rows/planes  fp16 ms  bf16 ms  fastest dense/planes")
    for m, n in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        packed = random_packed(m, n, seed=1)
        args = {"rows": _schema.op_args(packed, None),
                "planes": _schema.op_args(cpu_layout.packed_to_planes(packed), None)}
        x = torch.randn(batch, n).to(dtype)
        linear = torch.nn.functional.linear
        dtypes = (torch.float16, torch.bfloat16)
        dense = {dt: (torch.randn(batch, n).to(dt), (torch.randn(m, n) * 0.02).to(dt)) for dt in dtypes}
        calls = {"rows": partial(OP, x, *args["rows"]), "planes": partial(OP, x, *args["planes"]),
                 "fp16": partial(linear, *dense[torch.float16]), "bf16": partial(linear, *dense[torch.bfloat16])}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(median_ms(call, 15 if batch <= 16 else 5))
        r, p, f, b = (statistics.median(times[k]) for k in ("rows", "planes", "fp16", "bf16"))
        print(f"{m:>7} x {n:<7} {batch:>5} {r:9.3f} {p:10.3f} {r / p:11.2f}x {f:8.3f} {b:8.3f} {min(f, b) / p:20.2f}x")


def projections(rounds: int, dtype: torch.dtype) -> None:
    shapes = layer_shapes()
    templates = {s: random_packed(*s, seed=k) for k, s in enumerate(dict.fromkeys(shapes))}
    rows, planes = [], []
    for _ in range(22):
        for s in shapes:
            p = templates[s]
            p = dataclasses.replace(p, qweight=p.qweight.clone(), scale_codes=p.scale_codes.clone(),
                                    zero_codes=p.zero_codes.clone(), scale_meta=p.scale_meta.clone(),
                                    zero_meta=p.zero_meta.clone())
            rows.append((s[1], _schema.op_args(p, None)))
            planes.append((s[1], _schema.op_args(cpu_layout.packed_to_planes(p), None)))
    xs = {n: torch.randn(1, n).to(dtype) for n in {s[1] for s in shapes}}

    def sweep(layers) -> float:
        start = time.perf_counter()
        for n, a in layers:
            OP(xs[n], *a)
        return (time.perf_counter() - start) * 1e3

    print(" round  rows ms/token  planes ms/token  rows/planes")
    for r in range(rounds):
        a = statistics.median(sweep(rows) for _ in range(7))
        b = statistics.median(sweep(planes) for _ in range(7))
        print(f"{r + 1:>6} {a:14.2f} {b:16.2f} {a / b:12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                        help="the activations' dtype (SpQR's; the dense columns stay float16 and bfloat16)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes of the single layers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}  activations={args.dtype}  cpu_isa={_extension.cpu_isa()}")
    for batch in args.batches:
        single_layers(args.rounds, getattr(torch, args.dtype), batch)
    projections(args.rounds, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
