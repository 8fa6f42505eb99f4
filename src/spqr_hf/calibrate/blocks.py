"""Where the decoder blocks and their linear layers are, for any supported architecture.

Reuses optimum's GPTQ helpers (block-list name patterns, ``Conv1D``-aware linear search); they
import without gptqmodel. ``Conv1D`` (GPT-2) stores its weight transposed, ``[in, out]``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
# nn.Linear subclasses whose forward is still x @ W.T + b (other subclasses, e.g. MoE routers, are skipped)
PLAIN_LINEAR_SUBCLASSES = frozenset({"FalconLinear"})


class NoDecoderBlocksError(ValueError):
    """The model has no list of decoder blocks that calibration could walk through."""


@functools.cache
def _block_patterns() -> list[str]:
    """optimum's list of known block paths (``optimum/gptq/constants.py``).

    That file is executed on its own: importing it as ``optimum.gptq.constants`` runs
    ``optimum/gptq/__init__.py``, which pulls in optimum's quantizer, datasets and pandas
    (seconds and ~150 MB) that neither ``import spqr_hf`` nor calibration needs.
    """
    spec = importlib.util.find_spec("optimum")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "gptq" / "constants.py"
        if path.is_file():
            namespace: dict = {}
            exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)  # plain list literals
            return list(namespace["BLOCK_PATTERNS"])
    from optimum.gptq.constants import BLOCK_PATTERNS  # unusual install layout: pay the import

    return list(BLOCK_PATTERNS)


def find_block_list(model: nn.Module, block_name: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the decoder blocks: ``block_name`` if given, else the first known pattern."""
    candidates = [block_name] if block_name else _block_patterns()
    for name in candidates:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    if block_name:
        raise NoDecoderBlocksError(
            f"block_name_to_quantize={block_name!r} does not name a non-empty nn.ModuleList in "
            f"{type(model).__name__}; look at print(model) for the list of decoder blocks"
        )
    raise NoDecoderBlocksError(
        f"{type(model).__name__} has no list of decoder blocks at any of the known paths "
        f"({', '.join(_block_patterns())}); pass SpQRConfig(block_name_to_quantize='path.to.blocks') "
        "if the model has one under another name"
    )


def is_quantizable_linear(module: nn.Module) -> bool:
    """``nn.Linear``, ``Conv1D``, or an ``nn.Linear`` subclass that keeps the plain linear forward."""
    if isinstance(module, Conv1D) or type(module) is nn.Linear:
        return True
    return isinstance(module, nn.Linear) and (
        type(module).forward is nn.Linear.forward or type(module).__name__ in PLAIN_LINEAR_SUBCLASSES
    )


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Quantizable linear layers of one block, by name relative to it (like optimum's ``get_layers``,
    which accepts only exact ``nn.Linear`` and so misses e.g. Falcon's ``FalconLinear``)."""
    return {name: module for name, module in block.named_modules() if name and is_quantizable_linear(module)}


def is_skipped(full_name: str, skip: list[str] | None) -> bool:
    """Whether ``full_name`` matches an entry of ``modules_to_not_convert`` (whole name, suffix, or subtree)."""
    for entry in skip or ():
        if full_name == entry or full_name.endswith("." + entry) or full_name.startswith(entry + "."):
            return True
        if ("." + entry + ".") in ("." + full_name + "."):
            return True
    return False


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out_features, in_features]`` in float32: always a copy, so that it still
    holds the original after set_weight_matrix overwrites the layer (a float32 ``.to`` would alias it)."""
    weight = layer.weight.detach()
    if isinstance(layer, Conv1D):
        weight = weight.t()
    return weight.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # one copy, also for Conv1D


def set_weight_matrix(layer: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite the layer's weight from ``[out, in]`` (transposing back for ``Conv1D``), in place."""
    if isinstance(layer, Conv1D):
        weight = weight.t()
    layer.weight.data.copy_(weight.to(layer.weight.dtype))


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features
