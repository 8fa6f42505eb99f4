"""Running a model's own forward in pieces, so calibration needs no per-architecture code.

The model's forward builds what the blocks need (embeddings, masks, rotary tables) and applies what
follows them (final norm, output layer); calibration runs the blocks itself. So the forward is run
with its blocks' ``forward`` replaced (:func:`blocks_replaced`) and stopped by a hook raising
:class:`StopForward` at the point of interest, with the modules outside the blocks moved to the
calibration device meanwhile (:func:`outside_modules_on`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass once everything needed was seen."""


def has_own_tensors(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters or buffers itself (not only through children)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def outside_modules(model: nn.Module, block_name: str) -> list[nn.Module]:
    """Modules that hold parameters/buffers directly and are not inside the block list."""
    out = []
    for name, module in model.named_modules():
        inside = name == block_name or name.startswith(block_name + ".")
        if not inside and has_own_tensors(module):
            out.append(module)
    return out


@contextmanager
def outside_modules_on(model: nn.Module, block_name: str, device: torch.device) -> Iterator[None]:
    """The modules outside the block list on ``device`` for the duration, then back where they were."""
    outside = outside_modules(model, block_name)
    homes = [next(iter(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))).device for m in outside]
    for module in outside:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(outside, homes, strict=True):
            module.to(home)


@contextmanager
def blocks_replaced(blocks: nn.ModuleList, hook_for: Callable[[int], Callable]) -> Iterator[None]:
    """Block ``i`` runs ``hook_for(i)(module, args, kwargs)`` instead of its forward, for the duration."""
    # Instance-level forwards (accelerate's hooks install some) are put back as they were.
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks):
            block.forward = _passthrough(hook_for(index))
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward


def _passthrough(hook: Callable) -> Callable:
    def forward(*args, **kwargs):
        return hook(None, args, kwargs)
    return forward


def block_output(state: torch.Tensor, tuple_len: int) -> torch.Tensor | tuple:
    """What a block returns with hidden states ``state``: the tensor, or a tuple of ``tuple_len``."""
    return state if tuple_len == 0 else (state,) + (None,) * (tuple_len - 1)


def run_until_stopped(model: nn.Module, batch: torch.Tensor) -> None:
    """The model's forward on token ids ``batch`` (no cache), until a hook raises :class:`StopForward`."""
    try:
        model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    except StopForward:
        pass
