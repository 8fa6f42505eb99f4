"""The output layer (LM head) as an SpQR layer, when ``SpQRConfig(quantize_lm_head=True)`` asks.

The paper keeps the head in 16 bits, and so do we by default. But on a CPU it is the largest single
matvec of a decode step (32000 x 2048 in a TinyLlama-shaped model: a tenth of a bfloat16 token's
time once the blocks are SpQR), and for small models a large share of the weights. Its Hessian
comes from the inputs it sees behind the quantized blocks: the model's own forward (so its final
norm, whatever the architecture) runs with the blocks replaced by a replay of the last block's
outputs, and stops at the head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spqr_hf.calibrate.blocks import in_out_features, is_quantizable_linear, is_skipped
from spqr_hf.calibrate.forward import (
    StopForward,
    block_output,
    blocks_replaced,
    outside_modules_on,
    run_until_stopped,
)
from spqr_hf.core.hessian import HessianAccumulator


def output_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's output layer and its module name; ``ValueError`` if SpQR cannot quantize it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output layer (get_output_embeddings() is None): quantize_lm_head=True "
            "needs a causal LM, e.g. loaded with AutoModelForCausalLM"
        )
    if not is_quantizable_linear(head):
        raise ValueError(
            f"{type(model).__name__}'s output layer is a {type(head).__name__}, not a linear layer SpQR can quantize; "
            "set quantize_lm_head=False"
        )
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def check_output_layer(model: nn.Module, skip: list[str] | None) -> None:
    """Before loading: the output layer exists, is linear, and is not also listed as skipped."""
    name, _ = output_layer(model)
    if is_skipped(name, skip):
        raise ValueError(
            f"quantize_lm_head=True, but modules_to_not_convert={skip} skips the output layer {name!r}: drop one of "
            "the two"
        )


@torch.no_grad()
def output_layer_hessian(
    model: nn.Module, block_name: str, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int,
    last_outputs: list[torch.Tensor], tuple_len: int, device: torch.device,
) -> torch.Tensor:
    """H = 2/N sum x x^T over the output layer's inputs, given the last block's outputs per batch
    (``last_outputs``, batched like ``windows`` by ``batch_size``; ``tuple_len`` as the blocks return)."""
    _, head = output_layer(model)
    accumulator = HessianAccumulator(in_out_features(head)[0], device=device)
    dtype = head.weight.dtype
    current: dict[str, torch.Tensor] = {}

    def replay(index: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            state = current["last"] if index == 0 else (args[0] if args else kwargs["hidden_states"])
            return block_output(state, tuple_len)
        return hook

    def collect(module: nn.Module, args: tuple) -> None:
        accumulator.add_batch(args[0])
        raise StopForward

    handle = head.register_forward_pre_hook(collect)
    try:
        with outside_modules_on(model, block_name, device), blocks_replaced(blocks, replay):
            for batch, start in enumerate(range(0, windows.shape[0], batch_size)):
                current["last"] = last_outputs[batch].to(device=device, dtype=dtype)
                run_until_stopped(model, windows[start:start + batch_size].to(device))
    finally:
        handle.remove()
    if accumulator.num_tokens == 0:
        raise RuntimeError(f"{type(model).__name__}'s forward never reached its output layer")
    return accumulator.hessian


def untie_output_layer(model: nn.Module, name: str) -> None:
    """After the head was replaced: its weight no longer follows the input embeddings, in this model
    and in the config it saves (a reload would otherwise tie the embeddings to a packed layer)."""
    configs = {id(model.config): model.config}
    get_text_config = getattr(model.config, "get_text_config", None)
    if callable(get_text_config):
        text = get_text_config()
        configs[id(text)] = text
    for config in configs.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for key in [k for k in tied if k.startswith(name + ".")]:
            tied.pop(key)
