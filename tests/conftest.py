"""Shared fixtures: seeded generators and synthetic layers with realistic structure."""

from __future__ import annotations

import pytest
import torch

from spqr_hf.ops import _extension

ALL_ISAS = ["scalar", "avx2", "avx512", "avx512vnni", "avx512bf16", "amx"]  # the CPU kernels' instruction-set paths


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: random but reproducible inputs."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=ALL_ISAS)
def isa(request, monkeypatch) -> str:
    """Force each instruction-set path this CPU supports (SPQR_HF_CPU_ISA is read on every call)."""
    if request.param not in _extension.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv("SPQR_HF_CPU_ISA", request.param)
    assert _extension.cpu_isa() == request.param
    return request.param
