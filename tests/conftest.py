"""Shared fixtures: seeded generators and synthetic layers with realistic structure."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: random but reproducible inputs."""
    return torch.Generator().manual_seed(1234)
