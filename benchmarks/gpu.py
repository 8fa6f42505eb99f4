"""SpQR CUDA kernels vs torch float16 matmul on LLaMA-7B layer shapes (one table, one run).

Per-layer time at batch (tokens) 1, 4, 16 and 512, and a decode proxy: tokens/s of one
token passing through the seven linear layers of a LLaMA-7B block, 32 times (attention,
norms and the LM head excluded; the same seven layers are reused, which at 3 bits fits
partly in L2 and so flatters SpQR slightly at batch 1 - read it as an upper bound).
Layers are random but valid packed buffers at the paper's setting (3-bit weights, groups of
16, 3-bit statistics over 16 rows, ~1% outliers). Times are CUDA-event medians.

    python benchmarks/gpu.py [--batches 1 4 16 512] [--repeats 50] [--dtype float16]

Targets (issue 6): batch 1 >= 1.2x faster than fp16, batch 16 no slower, batch 512 within 1.3x.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from spqr_hf.format import layout
from spqr_hf.format.pack import PackedSpQR, pack_bits
from spqr_hf.ops import _cuda_loader, _schema

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q, k, v, o, gate, up, down
N_BLOCKS = 32


def random_packed(m: int, n: int, device: torch.device, seed: int = 0, bits: int = 3, groupsize: int = 16,
                  qq_groupsize: int = 16, stat_bits: int = 3, outliers: float = 0.01) -> PackedSpQR:
    """A valid packed layer with random codes, plausible statistics and random CSR outliers."""
    gen = torch.Generator().manual_seed(seed)
    n_groups, n_chunks = layout.num_groups(n, groupsize), layout.num_groups(m, qq_groupsize)

    def meta(center: float, spread: float) -> torch.Tensor:
        step = (torch.rand(n_groups, n_chunks, generator=gen) + 0.5) * spread
        return torch.stack([step, torch.rand(n_groups, n_chunks, generator=gen) * center], -1).half()

    nnz_per_row = max(1, int(n * outliers))
    cols = torch.sort(torch.rand(m, n, generator=gen).topk(nnz_per_row, dim=1).indices, dim=1).values
    packed = PackedSpQR(
        in_features=n, out_features=m, bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
        scale_bits=stat_bits, zero_bits=stat_bits,
        qweight=pack_bits(torch.randint(0, 1 << bits, (m, n), generator=gen), bits),
        scale_codes=pack_bits(torch.randint(0, 1 << stat_bits, (n_groups, m), generator=gen), stat_bits),
        zero_codes=pack_bits(torch.randint(0, 1 << stat_bits, (n_groups, m), generator=gen), stat_bits),
        scale_meta=meta(0.0, 0.002), zero_meta=meta(2.0, 0.5),
        perm=layout.to_uint16_storage(torch.randperm(n, generator=gen)),
        outlier_row_ptr=torch.arange(0, (m + 1) * nnz_per_row, nnz_per_row, dtype=torch.int32),
        outlier_col=layout.to_uint16_storage(cols.reshape(-1)),
        outlier_delta=(torch.randn(m * nnz_per_row, generator=gen) * 0.01).half(),
    )
    moved = {name: t.to(device) for name, t in packed.tensors().items()}
    return PackedSpQR(**{**packed.__dict__, **moved})


def cuda_time_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 512])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    if not _cuda_loader.cuda_kernels_available():
        sys.exit(f"the SpQR CUDA kernels are not loaded ({_cuda_loader.load_error()}); nothing was measured.")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, activations {args.dtype}")

    print(f"\n{'layer (out x in)':>18} {'batch':>6} {'fp16 ms':>9} {'spqr ms':>9} {'speedup':>8}")
    for seed, (m, n) in enumerate(SHAPES):
        packed = random_packed(m, n, device, seed=seed)
        args_ = _schema.op_args(packed, None)
        dense = torch.randn(m, n, device=device, dtype=dtype) * 0.02
        for batch in args.batches:
            x = torch.randn(batch, n, device=device, dtype=dtype)
            t_dense = cuda_time_ms(lambda x=x, w=dense: torch.nn.functional.linear(x, w), args.repeats)
            t_spqr = cuda_time_ms(lambda x=x, a=args_: torch.ops.spqr_hf.spqr_linear(x, *a), args.repeats)
            print(f"{m:>8} x {n:<7} {batch:>6} {t_dense:>9.4f} {t_spqr:>9.4f} {t_dense / t_spqr:>7.2f}x")

    block_packed = [random_packed(m, n, device, seed=10 + i) for i, (m, n) in enumerate(BLOCK)]
    block_dense = [torch.randn(m, n, device=device, dtype=dtype) * 0.02 for m, n in BLOCK]
    x4096, x11008 = (torch.randn(1, k, device=device, dtype=dtype) for k in (4096, 11008))

    def decode_dense() -> None:
        for _ in range(N_BLOCKS):
            for (_m, n), w in zip(BLOCK, block_dense, strict=True):
                torch.nn.functional.linear(x4096 if n == 4096 else x11008, w)

    def decode_spqr() -> None:
        for _ in range(N_BLOCKS):
            for (_m, n), p in zip(BLOCK, block_packed, strict=True):
                torch.ops.spqr_hf.spqr_linear(x4096 if n == 4096 else x11008, *_schema.op_args(p, None))

    t_dense = cuda_time_ms(decode_dense, max(5, args.repeats // 5))
    t_spqr = cuda_time_ms(decode_spqr, max(5, args.repeats // 5))
    print(f"\ndecode proxy (7 linears x {N_BLOCKS} blocks, batch 1): fp16 {1000 / t_dense:.1f} tok/s, "
          f"spqr {1000 / t_spqr:.1f} tok/s ({t_dense / t_spqr:.2f}x)")


if __name__ == "__main__":
    main()
