"""Greedy decoding on a TinyLlama-shaped model: SpQR CPU kernels vs dense bfloat16 and float32.

The model is ``transformers.LlamaForCausalLM`` built from a config (hidden 2048, intermediate
5632, 22 layers, 32 heads / 4 KV heads, vocab 32000) with random weights. For the SpQR run every
decoder ``nn.Linear`` (154 of them) is replaced by ``SpQRLinear.from_packed`` of random, valid
packed buffers at 3-bit weights, groups of 16, 3-bit statistics over 16 rows and ~1% outliers
(embeddings, norms and lm_head stay bfloat16, as in the dense bfloat16 model and the paper). The
"SpQR 3-bit + head" model also has its lm_head (32000 x 2048) packed at that setting, as
``SpQRConfig(quantize_lm_head=True)`` gives. "SpQR 3-bit, float32" is the SpQR model run in float32
throughout (what a float32 model's user gets), to be compared with dense float32. On a CPU with the
plane-layout kernels (AVX2, AVX-512) the SpQR layers decode on that layout, as ``SpQRLinear`` does by itself;
the "SpQR 3-bit, row streams" model is the bfloat16 SpQR model kept on the checkpoint's row streams
(``SPQR_HF_CPU_LAYOUT=rows``), for comparison in the same run. Each model runs in its own child process (so its RSS
is its own), one after the other; with ``--rounds N`` the models run N times in turn and the table
shows median tokens/s and the per-round ratios (the machines are noisy: dense bfloat16 alone varied
6.7-8.1 tokens/s within one session).

    python benchmarks/decode.py [--new-tokens 128] [--prompt-tokens 8] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kernel_speed import random_packed
from spqr_hf.format.pack import PackedSpQR
from spqr_hf.nn.linear import SpQRLinear
from spqr_hf.ops import _extension, cpu_layout

SPQR, SPQR_HEAD, SPQR_ROWS = "SpQR 3-bit", "SpQR 3-bit + head", "SpQR 3-bit, row streams"
SPQR_F32 = "SpQR 3-bit, float32"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tinyllama_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def weight_mib(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def spqr_copy(packed: PackedSpQR) -> SpQRLinear:
    """An SpQRLinear holding its own copy of ``packed``'s tensors (each layer reads its own memory)."""
    return SpQRLinear.from_packed(dataclasses.replace(packed, **{k: t.clone() for k, t in packed.tensors().items()}))


def to_spqr(model: LlamaForCausalLM) -> None:
    """Swap every decoder projection for an SpQRLinear (one random packed layer per shape, cloned)."""
    templates = {}
    for layer in model.model.layers:
        for path in PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, name)
            shape = (linear.out_features, linear.in_features)
            if shape not in templates:
                templates[shape] = random_packed(*shape, seed=len(templates))
            setattr(parent, name, spqr_copy(templates[shape]))
    gc.collect()


def decode_tokens_per_s(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / elapsed


def build(label: str) -> LlamaForCausalLM:
    """The model for one run, built directly in its dtype (no dense copy left behind for SpQR)."""
    config = tinyllama_config()
    dtype = torch.float32 if label in ("dense float32", SPQR_F32) else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if not label.startswith("SpQR"):
            return LlamaForCausalLM(config).eval()
        with torch.device("meta"):  # skeleton only: decoder projections become SpQRLinear below
            model = LlamaForCausalLM(config)
        to_spqr(model)
        if label == SPQR_HEAD:
            model.lm_head = spqr_copy(random_packed(config.vocab_size, config.hidden_size, seed=99))
        for module in model.modules():  # materialise what stays dense: embeddings, norms, lm_head (unless packed)
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    value = torch.ones(param.shape) if "norm" in type(module).__name__.lower() else (
                        torch.randn(param.shape) * 0.02)
                    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
        assert not leftover, leftover
        return model.eval()
    finally:
        torch.set_default_dtype(previous)


def release_free_memory() -> None:
    """Return the build's freed temporaries to the OS (glibc keeps them otherwise), so that RSS is
    the model's: packing the 32000 x 2048 head left ~60 MB resident that nothing used."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may include freed memory


def run_one(label: str, args: argparse.Namespace) -> None:
    if label == SPQR_ROWS:
        os.environ["SPQR_HF_CPU_LAYOUT"] = "rows"
    torch.manual_seed(0)
    prompt = torch.randint(0, 32000, (1, args.prompt_tokens))
    model = build(label)
    release_free_memory()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tps = decode_tokens_per_s(model, prompt, args.new_tokens)
    release_free_memory()  # the row streams SpQRLinear replaced by the plane layout on its first call
    print(f"RESULT {tps} {weight_mib(model)} {resident_mib()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="run the models this many times in turn")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one model per child process
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _extension.native_available():
        raise SystemExit(f"spqr_hf._C did not load ({_extension.load_error()}); build it with pip install -e .")
    if args.only:
        run_one(args.only, args)
        return
    print(f"threads={torch.get_num_threads()}  cpu_isa={_extension.cpu_isa()}  new tokens={args.new_tokens}  "
          f"rounds={args.rounds}  (each model in its own child process, so RSS is that model's)")
    labels = ("dense float32", "dense bfloat16", SPQR, SPQR_HEAD, SPQR_F32)
    if cpu_layout.kernels_available():
        labels += (SPQR_ROWS,)
    runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label in labels:
            command = [sys.executable, __file__, "--only", label, "--new-tokens", str(args.new_tokens),
                       "--prompt-tokens", str(args.prompt_tokens), "--threads", str(torch.get_num_threads())]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[label].append(tuple(float(v) for v in output.split("RESULT ")[-1].split()))
    print(f"{'model':>23} {'tokens/s':>9} {'weights MiB':>12} {'RSS MiB':>9} {'tok/s vs bf16':>14} "
          f"{'weights vs bf16':>16}")
    bf16_tps = [r[0] for r in runs["dense bfloat16"]]
    bf16_weights = runs["dense bfloat16"][0][1]
    for label in labels:
        tps = statistics.median(r[0] for r in runs[label])
        weights, rss = runs[label][0][1], max(r[2] for r in runs[label])
        speed = "-" if label == "dense float32" else f"{tps / statistics.median(bf16_tps):.2f}x"
        size = "-" if label == "dense float32" else f"{weights / bf16_weights:.2f}x"
        print(f"{label:>23} {tps:9.2f} {weights:12.0f} {rss:9.0f} {speed:>14} {size:>16}")
    comparisons = [(label, "dense bfloat16") for label in labels[2:]] + [(SPQR_F32, "dense float32")]
    for label, dense in comparisons:
        if args.rounds > 1 or dense == "dense float32":
            ratios = [spqr[0] / base[0] for spqr, base in zip(runs[label], runs[dense], strict=True)]
            print(f"{label} / {dense} per round: {', '.join(f'{r:.2f}x' for r in ratios)} "
                  f"(median {statistics.median(ratios):.2f}x)")


if __name__ == "__main__":
    main()
