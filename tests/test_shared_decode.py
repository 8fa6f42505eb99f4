"""The GPU kernels' decoding code, run on the CPU: csrc/include/spqr_hf/decode_tile.h vs the torch reference.

The CUDA kernels (csrc/cuda/*.cu) do their bit-level work through the host/device functions of
``decode_tile.h``; ``csrc/cuda/testing/decode_harness.cpp`` calls the very same functions in
a loop that emulates the kernels' grid (chunk per thread / lane, lane-strided outliers). It is
built here with g++ and called through ctypes, so CI checks the GPU's decoding without a GPU:
dequantization must be bit-identical to :func:`spqr_hf.format.pack.dequantize`, the matvec
within float32 rounding of a float64 matmul.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spqr_hf.format.pack import PackedSpQR, dequantize

from synthetic import random_packed

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "csrc" / "cuda" / "testing" / "decode_harness.cpp"


class PackedView(ctypes.Structure):
    """Mirror of ``spqr_hf::PackedView`` (decode_tile.h): nine pointers, then seven int32."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "qweight", "scale_codes", "zero_codes", "scale_meta", "zero_meta", "perm",
        "outlier_row_ptr", "outlier_col", "outlier_delta",
    )] + [(name, ctypes.c_int32) for name in (
        "in_features", "out_features", "bits", "groupsize", "qq_groupsize", "scale_bits", "zero_bits",
    )]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the shared-decode harness")
    library = tmp_path_factory.mktemp("decode_harness") / "decode_harness.so"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", f"-I{ROOT / 'csrc' / 'include'}",
         str(HARNESS), "-o", str(library)],
        check=True, capture_output=True, text=True,
    )
    lib = ctypes.CDLL(str(library))
    lib.spqr_harness_check_view.restype = ctypes.c_char_p
    lib.spqr_harness_check_view.argtypes = [ctypes.POINTER(PackedView)]
    lib.spqr_harness_dequantize.argtypes = [ctypes.POINTER(PackedView), ctypes.c_void_p]
    lib.spqr_harness_matvec.argtypes = [ctypes.POINTER(PackedView), ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _view(packed: PackedSpQR) -> tuple[PackedView, list[torch.Tensor]]:
    """A PackedView over contiguous CPU copies of the buffers (returned to keep them alive)."""
    keep = []

    def ptr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.contiguous()
        keep.append(t)
        return t.data_ptr() if t.numel() else None

    view = PackedView(
        ptr(packed.qweight), ptr(packed.scale_codes), ptr(packed.zero_codes), ptr(packed.scale_meta),
        ptr(packed.zero_meta), ptr(packed.perm), ptr(packed.outlier_row_ptr), ptr(packed.outlier_col),
        ptr(packed.outlier_delta), packed.in_features, packed.out_features, packed.bits, packed.groupsize,
        packed.qq_groupsize, packed.scale_bits, packed.zero_bits,
    )
    return view, keep


def _dequantize(lib: ctypes.CDLL, packed: PackedSpQR) -> torch.Tensor:
    view, _keep = _view(packed)
    out = torch.full((packed.out_features, packed.in_features), float("nan"))
    assert lib.spqr_harness_dequantize(ctypes.byref(view), out.data_ptr()) == 0
    return out


def _matvec(lib: ctypes.CDLL, packed: PackedSpQR, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    view, _keep = _view(packed)
    x = x.contiguous()
    out = torch.full((x.shape[0], packed.out_features), float("nan"))
    status = lib.spqr_harness_matvec(ctypes.byref(view), x.data_ptr(), x.shape[0],
                                     None if bias is None else bias.data_ptr(), out.data_ptr())
    assert status == 0
    return out


# (out, in, groupsize, qq_groupsize): partial last chunk / group / row chunk, groups below,
# at and above the 32-column chunk, and "whole row" groups (groupsize == in_features).
SHAPES = [(40, 96, 16, 16), (33, 100, 4, 8), (17, 250, 8, 32), (24, 320, 64, 16), (9, 70, 70, 4), (20, 1000, 256, 64)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("m", "n", "groupsize", "qq_groupsize"), SHAPES)
def test_dequantize_is_bit_identical_to_reference(harness, bits, m, n, groupsize, qq_groupsize):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    stat_bits = 3 if bits % 2 else 16  # bilevel statistics and raw float16 ones
    packed = random_packed(m, n, gen, bits=bits, groupsize=groupsize, qq_groupsize=qq_groupsize,
                           scale_bits=stat_bits, zero_bits=max(2, bits - 1), outlier_density=0.05, dense_rows=1)
    packed.validate()
    expected = dequantize(packed)
    got = _dequantize(harness, packed)
    assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max().item()}"


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3])
def test_dequantize_outlier_densities(harness, density):
    gen = torch.Generator().manual_seed(7)
    packed = random_packed(64, 200, gen, bits=3, groupsize=16, qq_groupsize=16, outlier_density=density,
                           dense_rows=2 if density else 0)
    assert torch.equal(_dequantize(harness, packed), dequantize(packed))


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize(("bits", "m", "n", "groupsize"), [(3, 48, 160, 16), (2, 31, 1100, 128), (8, 20, 64, 4),
                                                           (5, 16, 2100, 2100)])
def test_matvec_matches_float64_reference(harness, batch, bits, m, n, groupsize):
    gen = torch.Generator().manual_seed(batch * 100 + bits)
    packed = random_packed(m, n, gen, bits=bits, groupsize=groupsize, qq_groupsize=16, scale_bits=4,
                           zero_bits=16, outlier_density=0.02, dense_rows=1)
    x = torch.randn(batch, n, generator=gen)
    bias = torch.randn(m, generator=gen)
    expected = torch.nn.functional.linear(x.double(), dequantize(packed).double(), bias.double())
    got = _matvec(harness, packed, x, bias)
    # float32 accumulation over n terms: error bound ~ n * eps * sum|w x|.
    scale = torch.nn.functional.linear(x.double().abs(), dequantize(packed).double().abs()) + bias.double().abs()
    assert ((got.double() - expected).abs() <= 1e-6 * scale + 1e-6).all()


def test_check_view_rejects_what_kernels_cannot_read(harness):
    gen = torch.Generator().manual_seed(3)
    packed = random_packed(8, 64, gen, bits=3, groupsize=16, qq_groupsize=8)
    view, _keep = _view(packed)
    assert harness.spqr_harness_check_view(ctypes.byref(view)) is None
    cases = [("bits", 9, b"bits"), ("groupsize", 6, b"multiple of 4"), ("in_features", 70000, b"65536"),
             ("scale_meta", None, b"scale_meta")]
    for field, value, words in cases:
        bad, _keep2 = _view(packed)
        setattr(bad, field, value)
        message = harness.spqr_harness_check_view(ctypes.byref(bad))
        assert message is not None and words in message, (field, message)
        if field != "in_features":  # an absurd size is rejected before anything is read
            assert harness.spqr_harness_dequantize(ctypes.byref(bad), 0) == 1
