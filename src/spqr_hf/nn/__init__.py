"""torch modules built on the packed format."""

from spqr_hf.nn.linear import SpQRLinear

__all__ = ["SpQRLinear"]
