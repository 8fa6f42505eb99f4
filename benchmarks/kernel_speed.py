"""SpQR CPU kernel vs dense torch linear on LLaMA-7B layer shapes (one table, one run).

Layers are random but valid packed buffers at the issue's setting (3-bit weights, groups of 16,
3-bit statistics over 16 rows, ~1% outliers), generated directly with ``pack_bits``. Each cell is
the median of repeated runs with caches flushed before each (as in a model, where the other
layers evict a layer's weights), all measured side by side in this process. SpQR runs with
float32 and with bfloat16 activations at batch <= 16, bfloat16 above (the prefill setting), on the
buffers of an ``SpQRLinear`` after its first call: on a CPU with the plane-layout kernels (AVX2, AVX-512) its
codes are then in the plane layout (column "layout"), otherwise in the row streams. ``SpQR ms`` is the
kernel (the ``spqr_hf::spqr_linear`` operator's C++ callable on those buffers, as ``SpQRLinear`` calls
it), as the dense columns time ``torch.nn.functional.linear``;
at batch <= 16 the module columns time the ``SpQRLinear`` call and an ``nn.Linear`` call in the
activation dtype (what swapping one for the other in a model changes; both add Python, ~0.1 ms cold).
The calls of one row take turns (one each per round, caches flushed before each), so a slow phase of
a noisy machine weighs on all of them alike.

After each flush and before the timed call, the same call on a 64-row layer of the same kind (its own
weights) runs untimed: in a model the previous layer has just run the same code, so only the weights
are cold. Without it the flush evicts the code too, and the timed call also pays for fetching
torch's dispatcher, the operator and the threads' wake-up from memory (a 64 x 4096 bfloat16 layer on
the Zen 3 host: SpQR 249 -> 86 us, dense float16 144 -> 56 us). ``--cold-code`` times that case.

    python benchmarks/kernel_speed.py [--batches 1 512] [--repeats 20] [--threads N] [--cold-code]
        [--prefill-dtypes bfloat16 float32] [--float32-matmul-precision medium]
"""

from __future__ import annotations

import argparse
import functools
import glob
import statistics
import time

import torch

from spqr_hf.format import layout
from spqr_hf.format.pack import PackedSpQR, pack_bits
from spqr_hf.nn.linear import SpQRLinear
from spqr_hf.ops import _extension, _schema, dispatch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)


def random_packed(
    out_features: int, in_features: int, *, bits: int = 3, groupsize: int = 16, qq_groupsize: int = 16,
    stat_bits: int = 3, outlier_fraction: float = 0.01, seed: int = 0,
) -> PackedSpQR:
    """A valid packed layer with random codes, plausible statistics and random outliers."""
    g = torch.Generator().manual_seed(seed)
    m, n = out_features, in_features
    n_groups, n_chunks = layout.num_groups(n, groupsize), layout.num_groups(m, qq_groupsize)

    def codes(rows: int, count: int, b: int) -> torch.Tensor:
        return torch.randint(0, 1 << b, (rows, count), generator=g)

    def meta(center: float, spread: float) -> torch.Tensor:
        step = (torch.rand(n_groups, n_chunks, generator=g) + 0.5) * spread
        zero = torch.rand(n_groups, n_chunks, generator=g) * center
        return torch.stack([step, zero], dim=-1).to(torch.float16)

    def stats(center: float, spread: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if stat_bits == layout.RAW_STAT_BITS:  # the codes are the float16 bit patterns themselves
            values = (torch.rand(n_groups, m, generator=g) * spread * (1 << stat_bits) + center).to(torch.float16)
            return pack_bits(layout.from_uint16_storage(values.view(torch.int16)), stat_bits), None
        return pack_bits(codes(n_groups, m, stat_bits), stat_bits), meta(center, spread)

    scale_codes, scale_meta = stats(0.0, 2e-3 / (1 << stat_bits))
    zero_codes, zero_meta = stats((1 << bits) - 1, 1.0)
    nnz_target = int(outlier_fraction * m * n)
    flat = torch.randperm(m * n, generator=g)[:nnz_target].sort().values
    rows, cols = flat // n, flat % n
    row_ptr = torch.zeros(m + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    return PackedSpQR(
        in_features=n, out_features=m, bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
        scale_bits=stat_bits, zero_bits=stat_bits,
        qweight=pack_bits(codes(m, n, bits), bits),
        scale_codes=scale_codes, zero_codes=zero_codes, scale_meta=scale_meta, zero_meta=zero_meta,
        perm=layout.to_uint16_storage(torch.randperm(n, generator=g)),
        outlier_row_ptr=row_ptr.to(torch.int32),
        outlier_col=layout.to_uint16_storage(cols),
        outlier_delta=(torch.randn(nnz_target, generator=g) * 0.05).to(torch.float16),
    )


def _last_level_cache_bytes() -> int:
    """Size of the largest CPU cache Linux reports (0 if unknown)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


@functools.cache
def flush_buffer() -> torch.Tensor:
    """16x the last-level cache, at least 512 MiB, at most 1 GiB (a virtual machine may report its
    host's: 480 MiB was seen); made on first use, so that importing this module costs nothing.

    Writing 96 MiB (3x the 32 MiB L3 of a Zen 3 host) left part of an 8 MiB packed layer cached: a
    4096 x 4096 SpQR call took 0.63 ms after it and 0.76-0.77 ms after 384-768 MiB, an 11008 x 4096
    one 1.40 vs 1.68-1.89 ms, while the dense float16 ones (32-86 MiB) hardly changed (1.62 vs
    1.65-1.71 ms). Figures recorded before that (benchmarks/RESULTS.md) flatter SpQR per layer.
    """
    return torch.zeros(min(max(16 * _last_level_cache_bytes(), 512 * 2**20), 2**30) // 4)


def median_ms(fn, repeats: int, cold: bool = True) -> float:
    """Median wall time of ``fn``; with ``cold``, caches are flushed (untimed) before each call.

    In a model each layer's weights are evicted by the other layers' before they are used again,
    so a layer whose weights happen to fit in L3 (a 4096x4096 float16 matrix is 32 MiB) must not
    be timed warm.
    """
    return interleaved_median_ms({None: fn}, repeats, cold)[None]


def interleaved_median_ms(fns: dict, repeats: int, cold: bool = True, primers: dict | None = None) -> dict:
    """``median_ms`` of several functions whose calls take turns (one call each per round), so that
    a slow phase of a noisy machine weighs on all of them alike. ``primers[key]``, where given, runs
    untimed after the flush, just before ``fns[key]`` (a call that warms its code, not its data)."""
    primers = primers or {}
    for fn in (*fns.values(), *primers.values()):
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if cold:
                flush_buffer().add_(1.0)
            if key in primers:
                primers[key]()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def copy_bandwidth_gbs(repeats: int) -> float:
    """Read+write bandwidth of a 256 MiB tensor copy (bytes moved / time)."""
    src = torch.ones(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), max(5, repeats // 2), cold=False)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cold-code", action="store_true",
                        help="no untimed call of a small layer between the flush and the timed call")
    parser.add_argument("--prefill-dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"],
                        help="activation dtypes SpQR runs with at batches above 16")
    parser.add_argument("--float32-matmul-precision", choices=["highest", "high", "medium"], default=None,
                        help="torch.set_float32_matmul_precision before measuring (medium: bfloat16 GEMMs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if not _extension.native_available():
        raise SystemExit(f"spqr_hf._C did not load ({_extension.load_error()}); build it with pip install -e .")
    bandwidth = copy_bandwidth_gbs(args.repeats)
    print(f"threads={torch.get_num_threads()}  cpu_isa={_extension.cpu_isa()}  copy bandwidth={bandwidth:.1f} GB/s  "
          f"cache flush={flush_buffer().numel() * 4 / 2**20:.0f} MiB "
          f"({'code flushed too' if args.cold_code else 'code warmed'})  "
          f"float32 matmul precision={torch.get_float32_matmul_precision()}")
    header = (f"{'shape (out x in)':>17} {'batch':>5} {'act':>8} {'SpQR ms':>8} {'fp32 ms':>8} {'bf16 ms':>8} "
              f"{'fp16 ms':>8} {'fastest/SpQR':>12} {'bf16/SpQR':>9} {'floor ms':>8} {'bits/w':>6} {'layout':>6} "
              f"{'SpQRLinear ms':>13} {'nn.Linear ms':>12} {'modules':>7}")
    print(header)
    for m, n in SHAPES:
        packed, small_packed = random_packed(m, n), random_packed(64, n, seed=1)
        dense, small_dense = torch.randn(m, n), torch.randn(64, n)
        packed_bytes = packed.storage_bits() / 8
        bits_per_weight = packed.storage_bits() / (m * n)
        floor_ms = packed_bytes / (bandwidth / 2 * 1e9) * 1e3  # reading the packed bytes once
        for batch in args.batches:
            repeats = args.repeats if batch <= 16 else max(5, args.repeats // 2)
            # Decode-sized batches with both activation dtypes a model would use; prefill in bfloat16.
            prefill = tuple(getattr(torch, name) for name in args.prefill_dtypes)
            acts = (torch.float32, torch.bfloat16) if batch <= 16 else prefill
            calls, primers, layouts = {}, {}, {}
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                w, w_small, x = dense.to(dtype), small_dense.to(dtype), torch.randn(batch, n).to(dtype)
                calls[dtype] = lambda w=w, x=x: torch.nn.functional.linear(x, w)
                primers[dtype] = lambda w=w_small, x=x: torch.nn.functional.linear(x, w)
            with torch.no_grad():
                for act in acts:
                    x = torch.randn(batch, n).to(act)
                    layer, small = SpQRLinear.from_packed(packed), SpQRLinear.from_packed(small_packed)
                    # Each shares its packed tensors (a layout change replaces only the module's own buffer);
                    # the first call chooses the layout.
                    layer(x), small(x)
                    layouts[act] = "planes" if layer.qweight.dtype == torch.uint8 else "rows"
                    for name, spqr in (("SpQR", layer), ("small", small)):  # as SpQRLinear calls the operator
                        op_args = _schema.buffer_args(spqr._buffers, spqr.geometry)
                        calls[name, act] = lambda x=x, a=op_args: dispatch._CALL(x, *a)
                    primers["SpQR", act] = calls.pop(("small", act))
                    if batch <= 16:  # modules: a user's model swaps nn.Linear for SpQRLinear, same dtype
                        dense_module = torch.nn.Linear(n, m, bias=False, dtype=act)
                        dense_module.weight.copy_(dense)
                        small_module = torch.nn.Linear(n, small_dense.shape[0], bias=False, dtype=act)
                        small_module.weight.copy_(small_dense)
                        calls["SpQRLinear", act] = lambda x=x, f=layer: f(x)
                        calls["nn.Linear", act] = lambda x=x, f=dense_module: f(x)
                        primers["SpQRLinear", act] = lambda x=x, f=small: f(x)
                        primers["nn.Linear", act] = lambda x=x, f=small_module: f(x)
                ms = interleaved_median_ms(calls, repeats, primers=None if args.cold_code else primers)
            fastest = min(ms[dtype] for dtype in (torch.float32, torch.bfloat16, torch.float16))
            for act in acts:
                spqr_ms = ms["SpQR", act]
                modules = (f"{ms['SpQRLinear', act]:13.3f} {ms['nn.Linear', act]:12.3f} "
                           f"{ms['nn.Linear', act] / ms['SpQRLinear', act]:6.2f}x") if batch <= 16 else (
                    f"{'-':>13} {'-':>12} {'-':>7}")
                print(f"{m:>8} x {n:<6} {batch:>5} {str(act)[6:]:>8} {spqr_ms:8.3f} {ms[torch.float32]:8.3f} "
                      f"{ms[torch.bfloat16]:8.3f} {ms[torch.float16]:8.3f} {fastest / spqr_ms:11.2f}x "
                      f"{ms[torch.bfloat16] / spqr_ms:8.2f}x {floor_ms:8.3f} {bits_per_weight:6.2f} {layouts[act]:>6} "
                      f"{modules}")

if __name__ == "__main__":
    main()
