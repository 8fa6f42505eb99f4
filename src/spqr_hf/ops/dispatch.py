"""The one place that chooses how an SpQR linear runs.

Normally the ``spqr_hf::spqr_linear`` operator, whose dispatcher picks the native kernel
registered for the input's device (CPU / CUDA) and otherwise the torch reference.
``SPQR_HF_BACKEND=torch`` forces the reference path everywhere (debugging, comparisons).
"""

from __future__ import annotations

import os

import torch

from spqr_hf.format.pack import PackedSpQR
from spqr_hf.ops import _extension, _schema
from spqr_hf.ops.reference import spqr_linear_reference

_OP = torch.ops.spqr_hf.spqr_linear.default  # the overload itself: no overload resolution per call

# The environment is read on every call, by C getenv where the native module is built: os.environ's
# Python mapping took ~40 us per lookup on a cold cache (as a layer's call finds it after the other
# layers' weights went through), the C call ~10. Both see os.environ's changes (putenv).
_getenv = getattr(_extension.load(), "getenv", None) or os.environ.get
# The C++ operator itself: the OpOverload's Python __call__ in front of it took ~35 us more per call
# on a cold cache (a 64 x 4096 layer: 149 -> 112 us; F.linear of the same shape 107), ~3 us warm.
_CALL = getattr(_OP, "_op", _OP)


def _traceable_getenv(name: str) -> str | None:
    return os.environ.get(name)


def _traceable_call(*args: object) -> torch.Tensor:
    return _OP(*args)


# torch.compile cannot trace C builtins: it traces these in their place (eager calls are untouched).
for _builtin, _polyfill in ((_getenv, _traceable_getenv), (_CALL, _traceable_call)):
    if _builtin is not _polyfill and type(_builtin).__name__ == "builtin_function_or_method":
        torch.compiler.substitute_in_graph(_builtin, skip_signature_check=True)(_polyfill)


def force_reference() -> bool:
    """Whether the environment asks for the pure-torch path."""
    value = _getenv("SPQR_HF_BACKEND")
    return value is not None and value.lower() == "torch"


def spqr_linear(x: torch.Tensor, packed: PackedSpQR, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for the packed weight ``W``, on the best backend for ``x.device``."""
    if force_reference():
        return spqr_linear_reference(x, packed, bias)
    return _CALL(x, *_schema.op_args(packed, bias))


def spqr_linear_module(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """``spqr_linear`` for an ``SpQRLinear``: its buffers go to the operator as they are.

    Building a ``PackedSpQR`` and its argument tuple on every call cost ~4 of a small layer's ~20 us
    (decoding a 1B model calls 154 layers per token).
    """
    buffers = layer._buffers
    if force_reference():
        return spqr_linear_reference(x, layer.packed, buffers["bias"])
    return _CALL(x, *_schema.buffer_args(buffers, layer.geometry))
