"""Operators on packed SpQR weights: the torch reference and the backend dispatch point."""

from spqr_hf.ops.dispatch import backend_for, register_backend, spqr_linear
from spqr_hf.ops.reference import spqr_linear_reference

__all__ = ["backend_for", "register_backend", "spqr_linear", "spqr_linear_reference"]
