"""Operators on packed SpQR weights: the operator schema, the torch reference, the dispatch point."""

from spqr_hf.ops import _cuda_loader, _extension
from spqr_hf.ops.dispatch import force_reference, spqr_linear
from spqr_hf.ops.reference import spqr_linear_reference

_extension.load()  # registers the native CPU kernel when it was built; warns once when not
_cuda_loader.load()  # registers the CUDA kernels when they were built; quiet when not

__all__ = ["force_reference", "spqr_linear", "spqr_linear_reference"]
