"""Replaying work the block-by-block driver has already done, so each block runs fewer passes.

With ``true_sequential`` a block is run once per group of linears (q/k/v, o, gate/up, down);
most of each pass recomputes children whose linears are already final. Two shortcuts, both
exact (the quantized model is bit-identical with or without them, tested):

- a direct child of the block (e.g. ``self_attn``) whose linears are all final, and that runs
  after children whose linears are all final, sees the same inputs and gives the same output
  in every later pass (same batch): it is computed once and its output replayed;
- a pass that stops at a child's *last* linear (o_proj, whose Hessian is being collected) has
  already computed everything in that child before it: its input is kept (when no larger than
  the block's input), and in the next pass the child's output is that linear applied to it,
  once the first batch showed the child returns exactly that linear's output. Attention then
  runs once per block instead of twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CACHE_FROZEN_CHILDREN = True


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a module output that is a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, (tuple, list)) else output


class FrozenChildCache:
    """Output cache for a block's direct children; keys count calls, so a child called twice
    per pass is safe. ``final`` holds the names of the linears already quantized."""

    def __init__(self, block: nn.Module, linear_order: list[str]) -> None:
        self.final: set[str] = set()
        self.store_outputs = True
        self._block = block
        self._linears: dict[str, set[str]] = {}
        self._last_linear: dict[str, str] = {}  # child -> its last linear in call order
        self._wrapped_children: dict[str, Callable | None] = {}  # name -> instance forward it had
        self._store: dict[tuple, Any] = {}
        self._tail_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._tail_shape: dict[str, tuple[type, int] | None] = {}  # child -> output structure, None: no replay
        self._batch: int | None = None
        self._called: list[str] = []
        for name, child in block.named_children():
            inside = [n for n in linear_order if n == name or n.startswith(name + ".")]
            self._linears[name] = set(inside)
            if inside and CACHE_FROZEN_CHILDREN:
                self._last_linear[name] = inside[-1]
                self._wrapped_children[name] = child.__dict__.get("forward")  # e.g. an accelerate hook
                child.forward = self._wrapped(name, child.forward)

    def begin_pass(self, batch: int) -> None:
        self._batch, self._called = batch, []

    def _frozen(self, name: str) -> bool:
        return all(self._linears.get(n, set()) <= self.final for n in (*self._called, name))

    def keep_tail_input(self, linear: str, inputs: torch.Tensor, block_input: torch.Tensor) -> None:
        """Called where a pass stops at ``linear``: keep its input if it is the last linear of
        the running child, everything before it in the pass is final, and it is no larger than
        ``block_input`` (kept where the block inputs live, e.g. on the CPU during GPU calibration)."""
        if not self._called or self._batch is None:
            return
        child = self._called[-1]
        earlier_final = all(self._linears[n] <= self.final for n in self._called[:-1])
        if (self._last_linear.get(child) != linear or not earlier_final
                or not self._linears[child] - {linear} <= self.final
                or self._tail_shape.get(child, ()) is None
                or inputs.untyped_storage().nbytes() > block_input.numel() * block_input.element_size()):
            return
        key = (self._batch, child, self._called.count(child) - 1)
        self._tail_inputs[key] = (linear, inputs.to(block_input.device))

    def _linear_on_kept(self, tail: tuple[str, torch.Tensor]) -> torch.Tensor:
        linear = self._block.get_submodule(tail[0])
        weight = next(linear.parameters(), None)
        return linear(tail[1] if weight is None else tail[1].to(weight.device))

    def _replay_tail(self, name: str, tail: tuple[str, torch.Tensor]) -> Any:
        kind, length = self._tail_shape[name]
        out = self._linear_on_kept(tail)
        return out if kind is torch.Tensor else kind((out,) + (None,) * (length - 1))

    def _learn_tail_shape(self, name: str, out: Any, tail: tuple[str, torch.Tensor]) -> None:
        """Replay ``name`` from its last linear only if its output is exactly that linear's output."""
        expected = self._linear_on_kept(tail)
        if isinstance(out, torch.Tensor):
            shape = (torch.Tensor, 1)
        elif type(out) in (tuple, list) and out and all(v is None for v in out[1:]):
            shape = (type(out), len(out))
        else:
            shape = None
        first = first_tensor(out)
        same = isinstance(first, torch.Tensor) and first.shape == expected.shape and torch.equal(first, expected)
        self._tail_shape[name] = shape if same else None

    def _wrapped(self, name: str, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            frozen = self._batch is not None and self._frozen(name)
            key = (self._batch, name, self._called.count(name))
            self._called.append(name)
            if frozen and key in self._store:
                return self._store[key]
            tail = self._tail_inputs.pop(key, None) if frozen else None
            if tail is not None and self._tail_shape.get(name) is not None:
                out = self._replay_tail(name, tail)
            else:
                out = forward(*args, **kwargs)
                if tail is not None and name not in self._tail_shape:
                    self._learn_tail_shape(name, out, tail)
            if frozen and self.store_outputs:
                self._store[key] = out
            return out
        return run

    def close(self) -> None:
        """Restore the children's forwards and drop everything kept."""
        for name, previous in self._wrapped_children.items():
            child = self._block.get_submodule(name)
            if previous is None:
                child.__dict__.pop("forward", None)
            else:
                child.forward = previous
        self._store.clear()
        self._tail_inputs.clear()
