"""The CUDA kernels (spqr_hf._C_cuda) against the torch reference, on a GPU.

Skipped, with the reason, where there is no GPU or the CUDA extension was not built. On the
CPU, CI still checks the kernels' decoding code (tests/test_shared_decode.py) and that they
compile and register (tests/test_cuda_compile.py).

TODO (HF integration helper): quantize -> save -> reload -> generate on a tiny model on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from spqr_hf.format.pack import PackedSpQR, dequantize
from spqr_hf.ops import _cuda_loader, _schema

from synthetic import random_packed

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU available: the CUDA kernels cannot run here", allow_module_level=True)
if not _cuda_loader.cuda_kernels_available():
    pytest.skip(f"CUDA extension spqr_hf._C_cuda not loaded: {_cuda_loader.load_error()}", allow_module_level=True)

DEVICE = torch.device("cuda")
# Relative error bound vs a float64 reference: the kernels accumulate in float32 and round the
# output (and, on the GEMM path, the dequantized weight) to the activation dtype.
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _to(packed: PackedSpQR, device: torch.device) -> PackedSpQR:
    moved = {name: t.to(device) for name, t in packed.tensors().items()}
    return PackedSpQR(**{**packed.__dict__, **moved})


def _run_op(x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.spqr_hf.spqr_linear(x, *_schema.op_args(packed, bias))


def _check(x_cpu: torch.Tensor, packed_cpu: PackedSpQR, bias_cpu: torch.Tensor | None, dtype: torch.dtype) -> None:
    x = x_cpu.to(DEVICE, dtype)
    bias = None if bias_cpu is None else bias_cpu.to(DEVICE)
    out = _run_op(x, _to(packed_cpu, DEVICE), bias)
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], packed_cpu.out_features)
    weight = dequantize(packed_cpu).double()
    expected = x.cpu().double() @ weight.t() + (0 if bias_cpu is None else bias_cpu.double())
    magnitude = x.cpu().double().abs() @ weight.abs().t() + 1e-3
    error = ((out.cpu().double() - expected).abs() / magnitude).max().item()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e} above {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 16, 17, 64])
def test_bits_and_batch_paths(dtype, bits, tokens):
    gen = torch.Generator().manual_seed(bits * 100 + tokens)
    packed = random_packed(96, 1056, gen, bits=bits, groupsize=16, qq_groupsize=16, outlier_density=0.01, dense_rows=1)
    _check(torch.randn(tokens, 1056, generator=gen), packed, torch.randn(96, generator=gen), dtype)


@pytest.mark.parametrize(("m", "n", "groupsize", "qq_groupsize", "scale_bits", "zero_bits"), [
    (64, 4096, 4, 16, 3, 3), (64, 4096, 8, 32, 16, 16), (33, 1000, 32, 8, 2, 8), (48, 4096, 128, 64, 3, 16),
    (20, 11008, 256, 16, 3, 3), (16, 28672, 16, 16, 3, 3),  # wider than 48 KB of activations
    (40, 300, 300, 4, 4, 4), (7, 70, 70, 1, 3, 3),  # whole-row groups, odd sizes
])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_shapes_and_group_sizes(m, n, groupsize, qq_groupsize, scale_bits, zero_bits, tokens):
    gen = torch.Generator().manual_seed(m + n + tokens)
    packed = random_packed(m, n, gen, bits=3, groupsize=groupsize, qq_groupsize=qq_groupsize, scale_bits=scale_bits,
                           zero_bits=zero_bits, outlier_density=0.01)
    _check(torch.randn(2, tokens, n, generator=gen), packed, None, torch.float16)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5])
@pytest.mark.parametrize("tokens", [1, 8, 40])
def test_outlier_densities(density, tokens):
    gen = torch.Generator().manual_seed(int(density * 1000) + tokens)
    packed = random_packed(128, 512, gen, bits=3, groupsize=16, qq_groupsize=16, outlier_density=density,
                           dense_rows=3 if density else 0)
    _check(torch.randn(tokens, 512, generator=gen), packed, None, torch.float16)


def test_float32_activations_take_the_dequantize_path():
    gen = torch.Generator().manual_seed(5)
    packed = random_packed(64, 256, gen, bits=4, groupsize=32, qq_groupsize=16)
    _check(torch.randn(3, 256, generator=gen), packed, torch.randn(64, generator=gen), torch.float32)


def test_bad_input_raises_clear_error():
    gen = torch.Generator().manual_seed(6)
    packed = _to(random_packed(16, 64, gen), DEVICE)
    with pytest.raises(RuntimeError, match="in_features"):
        _run_op(torch.randn(1, 65, device=DEVICE, dtype=torch.float16), packed, None)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        _run_op(torch.randn(1, 64, device=DEVICE, dtype=torch.float64), packed, None)


def test_runs_on_the_current_stream():
    gen = torch.Generator().manual_seed(8)
    packed = _to(random_packed(64, 512, gen), DEVICE)
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = _run_op(x, packed, None)
    stream.synchronize()
    assert torch.allclose(out.float(), _run_op(x, packed, None).float())


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    packed = _to(random_packed(32, 128, gen), DEVICE)
    x = torch.randn(2, 128, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(torch.ops.spqr_hf.spqr_linear.default, (x, *_schema.op_args(packed, None)),
                          test_utils=("test_schema", "test_faketensor"))
