"""Loads the native kernels (``spqr_hf._C``) once, quietly, and remembers why they did not load.

Importing ``_C`` registers its CPU kernel for the ``spqr_hf::spqr_linear`` operator (the schema
in :mod:`spqr_hf.ops._schema` is imported first). When the extension is missing (no compiler at
install time, an opted-out build, a torch ABI mismatch) the package still works: the operator's
pure-torch default implementation runs instead, after one warning.
"""

from __future__ import annotations

from types import ModuleType

from spqr_hf.ops._optional import OptionalExtension

_CPU = OptionalExtension(
    "spqr_hf._C",
    warn_hint="spqr_hf: native CPU kernels are not available, using the slower pure-torch path; reinstall "
              "with a C++ compiler present (pip install -e .) to build them",
)


def load() -> ModuleType | None:
    """Import ``spqr_hf._C`` on the first call (warning once if it cannot); later calls are free."""
    return _CPU.load()


def native_available() -> bool:
    """Whether the native CPU kernels are loaded."""
    return load() is not None


def load_error() -> str | None:
    """Why ``spqr_hf._C`` did not load, or None when it did (or was not tried yet)."""
    return _CPU.load_error()


def cpu_isa() -> str | None:
    """Instruction set the CPU kernels use now (``SPQR_HF_CPU_ISA`` honoured), or None without them."""
    module = load()
    return None if module is None else module.cpu_isa()


def supported_isas() -> list[str]:
    """Instruction sets with CPU kernels this machine can run, best first (empty without them)."""
    module = load()
    return [] if module is None else list(module.supported_isas())
