"""Import a compiled extension at most once, quietly, remembering why it did not load.

Importing a kernel extension registers its kernels for the ``spqr_hf::spqr_linear`` operator
(the schema in :mod:`spqr_hf.ops._schema` is imported first). A missing extension is never an
error: the operator's pure-torch default implementation runs instead.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

from spqr_hf.ops import _schema  # noqa: F401 - the schema must exist before kernels register


class OptionalExtension:
    """One compiled module that may or may not be there.

    ``unavailable_reason`` says up front why loading is pointless (None to try); ``warn_hint``,
    when given, is warned once if the import fails (unless ``SPQR_HF_BACKEND=torch``).
    """

    def __init__(self, name: str, *, unavailable_reason: Callable[[], str | None] = lambda: None,
                 warn_hint: str | None = None) -> None:
        self.name = name
        self._unavailable_reason = unavailable_reason
        self._warn_hint = warn_hint
        self._module: ModuleType | None = None
        self._error: str | None = None
        self._attempted = False

    def load(self) -> ModuleType | None:
        """Import the module on the first call; later calls are free. Never raises."""
        if self._attempted:
            return self._module
        self._attempted = True
        self._error = self._unavailable_reason()
        if self._error is not None:
            return None
        try:
            self._module = importlib.import_module(self.name)
        except (ImportError, OSError) as error:
            self._error = f"{type(error).__name__}: {error}"
            if self._warn_hint and os.environ.get("SPQR_HF_BACKEND", "").lower() != "torch":
                warnings.warn(f"{self._warn_hint} ({self._error})", RuntimeWarning, stacklevel=3)
        return self._module

    def load_error(self) -> str | None:
        """Why the module did not load, or None when it did (or was not tried yet)."""
        return self._error
