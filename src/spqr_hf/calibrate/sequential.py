"""Block-by-block SpQR calibration of a transformers model (GPTQ's sequential recipe).

1. Capture what every decoder block receives: hidden states of block 0 plus every keyword
   argument each block is called with (attention mask, position ids, rotary embeddings...),
   by running the model once per batch with the blocks replaced by pass-through catchers.
2. For each block, on the calibration device: find the order in which its linears are called
   and which share an input (q/k/v; gate/up), accumulate one Hessian per distinct input, quantize
   with the engine, and put the reconstructed (dequantized) weights in place so later groups
   (``true_sequential``) and the next block see the quantized model. Passes stop as soon as
   the last needed input was seen. Then recompute the block's outputs as the next inputs,
   swap in ``SpQRLinear`` modules and move the block back.

The engine is a parameter (``layer_quantizer``) so baselines (RTN, GPTQ) run through the same driver.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from spqr_hf.calibrate.blocks import (
    find_block_list,
    find_linears,
    in_out_features,
    is_skipped,
    set_weight_matrix,
    weight_matrix,
)
from spqr_hf.calibrate.forward import (
    StopForward,
    block_output,
    blocks_replaced,
    outside_modules_on,
    run_until_stopped,
)
from spqr_hf.calibrate.head import output_layer, output_layer_hessian, untie_output_layer
from spqr_hf.calibrate.replay import FrozenChildCache, first_tensor
from spqr_hf.config import check_calibration_dtype
from spqr_hf.core.hessian import HessianAccumulator
from spqr_hf.core.params import SpQRParams
from spqr_hf.core.spqr import SpQRResult, spqr_quantize, spqr_quantize_shared
from spqr_hf.format.pack import dequantize
from spqr_hf.nn.linear import SpQRLinear

logger = logging.getLogger("spqr_hf")

LayerQuantizer = Callable[[torch.Tensor, torch.Tensor, SpQRParams], SpQRResult]
_TOKENS_PER_BATCH = 8192


def spqr_layer_quantizer(weight: torch.Tensor, hessian: torch.Tensor, params: SpQRParams) -> SpQRResult:
    """The default ``layer_quantizer``: the SpQR engine, keeping its reconstruction."""
    return spqr_quantize(weight, hessian, params, keep_reconstruction=True)


@dataclass
class LayerReport:
    """What quantizing one linear layer produced."""

    name: str
    in_features: int
    out_features: int
    nnz: int
    relative_error: float  # ||(W - Q) X||^2 / ||W X||^2 over the calibration inputs
    outlier_fraction: float
    storage_bits: int  # bits of the packed buffers (bias excluded)
    damp_percent: float
    seconds: float

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class QuantizationReport:
    """All layers of one calibration run, plus the summary the model card and CLI print."""

    params: SpQRParams
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        weights = sum(layer.numel for layer in self.layers)
        nnz = sum(layer.nnz for layer in self.layers)
        fraction = nnz / max(1, weights)
        return {
            "layers": len(self.layers),
            "weights": weights,
            "avg_bits_formula": round(self.params.formula_bits(fraction), 4),
            "avg_bits_stored": round(sum(layer.storage_bits for layer in self.layers) / max(1, weights), 4),
            "outlier_fraction": round(fraction, 6),
            "mean_relative_error": round(
                sum(layer.relative_error for layer in self.layers) / max(1, len(self.layers)), 6),
            "seconds": round(self.seconds, 2),
        }

    def summary_line(self) -> str:
        s = self.summary()
        return (
            f"SpQR quantized {s['layers']} layers ({s['weights']} weights): average bits {s['avg_bits_formula']:.3f} "
            f"(formula) / {s['avg_bits_stored']:.3f} (stored), outliers {100 * s['outlier_fraction']:.3f}%, "
            f"mean relative error {s['mean_relative_error']:.4g}, wall time {s['seconds']:.1f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "layers": [asdict(layer) for layer in self.layers]}


def calibration_device(requested: str | torch.device | None) -> torch.device:
    """``requested`` if set, else CUDA when available, else CPU."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


@dataclass
class _BlockCall:
    """How the model called blocks for one batch: positional extras and keywords, per block."""

    args: tuple  # positional arguments after the hidden states (shared by all blocks)
    kwargs: list[dict[str, Any]]  # per block (entries are the same object when identical)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block_name: str, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int,
    device: torch.device, activation_device: torch.device,
) -> tuple[list[torch.Tensor], list[_BlockCall], int]:
    """Hidden states entering block 0 (one tensor per batch), every block's call arguments, and the
    blocks' output structure (0: a tensor, else the length of the tuple they return)."""
    first_batch = windows[:batch_size].to(device)
    records: dict[str, Any] = {}

    def learn(module, args, kwargs):
        records["args"], records["kwargs"] = args, kwargs
        raise StopForward

    with outside_modules_on(model, block_name, device):
        # Learn the output structure of a real block (tensor or tuple) once, on the first batch.
        handle = blocks[0].register_forward_pre_hook(learn, with_kwargs=True)
        try:
            run_until_stopped(model, first_batch)
        finally:
            handle.remove()
        if "args" not in records:
            raise RuntimeError("the model's forward never reached its first decoder block")
        home0 = next(iter(blocks[0].parameters())).device
        blocks[0].to(device)
        sample = blocks[0](*records["args"], **records["kwargs"])
        blocks[0].to(home0)
        tuple_len = len(sample) if isinstance(sample, (tuple, list)) else 0
        del sample
        records.clear()

        hidden: list[torch.Tensor] = []
        calls: list[_BlockCall] = []
        current: dict[str, Any] = {}

        def catcher(index: int):
            def hook(module, args, kwargs):
                state = args[0] if args else kwargs["hidden_states"]
                if index == 0:
                    current["hidden"] = state
                    current["args"] = args[1:]
                    current["kwargs"] = []
                previous = current["kwargs"][-1] if current["kwargs"] else None
                same = previous is not None and previous.keys() == kwargs.keys() and all(
                    previous[k] is kwargs[k] for k in kwargs)
                current["kwargs"].append(previous if same else dict(kwargs))
                if index == len(blocks) - 1:
                    raise StopForward
                return block_output(state, tuple_len)
            return hook

        with blocks_replaced(blocks, catcher):
            for start in range(0, windows.shape[0], batch_size):
                run_until_stopped(model, windows[start:start + batch_size].to(device))
                hidden.append(current["hidden"].to(activation_device))
                calls.append(_BlockCall(args=current["args"], kwargs=current["kwargs"]))
                current.clear()
    return hidden, calls, tuple_len


def _run_block(block: nn.Module, hidden: torch.Tensor, call: _BlockCall, index: int, device: torch.device) -> Any:
    return block(hidden.to(device), *call.args, **call.kwargs[index])


@torch.no_grad()
def discover_groups(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, call: _BlockCall,
                    index: int, device: torch.device) -> list[list[str]]:
    """Linears in call order, grouped by shared input (q/k/v together): one Hessian per group."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, layer in linears.items():
        def record(module, args, name=name):
            if all(n != name for n, _ in order):
                order.append((name, args[0]))
        handles.append(layer.register_forward_pre_hook(record))
    try:
        _run_block(block, hidden, call, index, device)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    owners: list[torch.Tensor] = []
    for name, inputs in order:
        for group, owner in zip(groups, owners, strict=True):
            if owner is inputs:
                group.append(name)
                break
        else:
            groups.append([name])
            owners.append(inputs)
    unused = set(linears) - {n for n, _ in order}
    if unused:
        logger.warning("linear layers never called during calibration are left unquantized: %s", sorted(unused))
    return groups


@torch.no_grad()
def _accumulate(block: nn.Module, linears: dict[str, nn.Module], groups: list[list[str]], hidden: list[torch.Tensor],
                calls: list[_BlockCall], index: int, device: torch.device,
                cache: FrozenChildCache | None = None) -> dict[str, HessianAccumulator]:
    """One Hessian per group (keyed by its first layer); each pass stops at the last group's input,
    which ``cache`` may keep for the next pass (up to the size of the block's input)."""
    accumulators = {g[0]: HessianAccumulator(in_out_features(linears[g[0]])[0], device=device) for g in groups}
    last = groups[-1][0]
    block_input = torch.empty(0)
    handles = []
    for owner, acc in accumulators.items():
        def hook(module, args, acc=acc, owner=owner, stop=owner == last):
            acc.add_batch(args[0])
            if stop:
                if cache is not None:
                    cache.keep_tail_input(owner, args[0], block_input)
                raise StopForward
        handles.append(linears[owner].register_forward_pre_hook(hook))
    try:
        for batch, (state, call) in enumerate(zip(hidden, calls, strict=True)):
            block_input = state
            if cache is not None:
                cache.begin_pass(batch)
            try:
                _run_block(block, state, call, index, device)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = weight - quantized
    num = float((delta @ hessian).mul_(delta).sum())
    den = float((weight @ hessian).mul_(weight).sum())
    return num / den if den > 0 else math.inf if num > 0 else 0.0


def calibration_dtype(requested: str | None, model: nn.Module, device: torch.device) -> torch.dtype:
    """Dtype of the calibration forward passes: ``requested``, or "auto" = bfloat16 for float32 and
    float16 models on a CPU with native bfloat16 matmuls, else the model's own dtype."""
    if requested not in (None, "auto"):
        check_calibration_dtype(requested)
        return getattr(torch, requested)
    model_dtype = next(model.parameters()).dtype
    if device.type == "cpu" and model_dtype in (torch.float32, torch.float16) and _cpu_has_fast_bf16():
        return torch.bfloat16  # CPU float16 matmuls are ~10x slower than bfloat16 ones
    return model_dtype


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512_bf16" in _cpu_flags()
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return info.read()
    except OSError:
        return ""


def _block_dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


def _cast_call(call: _BlockCall, dtype: torch.dtype) -> _BlockCall:
    """The block call with its floating tensors (rotary tables, float masks) in ``dtype``."""
    def cast(value: Any) -> Any:
        return _map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)

    cache: dict[int, dict[str, Any]] = {}
    kwargs = [cache.setdefault(id(kw), cast(kw)) for kw in call.kwargs]  # keep shared dicts shared
    return _BlockCall(args=cast(call.args), kwargs=kwargs)


def _layer_report(name: str, weight: torch.Tensor, recon: torch.Tensor, hessian: torch.Tensor, result: SpQRResult,
                  seconds: float) -> LayerReport:
    packed = result.packed
    rel = _relative_error(weight, recon, hessian)
    report = LayerReport(
        name=name, in_features=packed.in_features, out_features=packed.out_features, nnz=packed.nnz,
        relative_error=rel, outlier_fraction=result.outlier_fraction, storage_bits=packed.storage_bits(),
        damp_percent=result.damp_percent, seconds=seconds,
    )
    logger.info(
        "%s [%dx%d]: relative error %.4g, outliers %.3f%%, %.3f bits stored, %.2f s",
        name, packed.out_features, packed.in_features, rel, 100 * result.outlier_fraction,
        packed.storage_bits() / max(1, report.numel), seconds,
    )
    return report


def _quantize_group(weights: list[torch.Tensor], hessian: torch.Tensor, params: SpQRParams,
                    layer_quantizer: LayerQuantizer | None) -> tuple[list[SpQRResult], float]:
    """Layers that share ``hessian`` (q/k/v, ...), quantized; with the seconds spent per layer."""
    start = time.perf_counter()
    if layer_quantizer is None:
        results = spqr_quantize_shared(weights, hessian, params, keep_reconstruction=True)
    else:
        results = [layer_quantizer(w, hessian, params) for w in weights]
    return results, (time.perf_counter() - start) / len(weights)


def _quantize_output_layer(model: nn.Module, hessian: torch.Tensor, params: SpQRParams, device: torch.device,
                           layer_quantizer: LayerQuantizer | None, report: QuantizationReport,
                           quantized_layers: dict[str, int]) -> None:
    """Replace the output layer by its SpQR layer (quantized on ``device``, kept where it was)."""
    name, head = output_layer(model)
    home = head.weight.device
    weight = weight_matrix(head).to(device)
    [result], seconds = _quantize_group([weight], hessian, params, layer_quantizer)
    report.layers.append(_layer_report(name, weight, _reconstruction(result), hessian, result, seconds))
    quantized_layers[name] = result.packed.nnz
    _set_module(model, name, _packed_module(head, result).to(home))
    untie_output_layer(model, name)


def _reconstruction(result: SpQRResult) -> torch.Tensor:
    """The dequantized weight: the engine's own when it kept it, else decoded from the packed layer."""
    return result.reconstruction if result.reconstruction is not None else dequantize(result.packed)


def _packed_module(layer: nn.Module, result: SpQRResult) -> SpQRLinear:
    """The ``SpQRLinear`` that replaces ``layer``: its packed weight, its bias, its source type."""
    bias = layer.bias.detach() if getattr(layer, "bias", None) is not None else None
    module = SpQRLinear.from_packed(result.packed, bias)
    module.source_type = type(layer).__name__
    return module


def _default_batch_size(seqlen: int, nsamples: int) -> int:
    return max(1, min(nsamples, _TOKENS_PER_BATCH // max(1, seqlen)))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: Any,
    windows: torch.Tensor,
    *,
    layer_quantizer: LayerQuantizer | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize every linear inside the decoder blocks of ``model`` in place (and its output layer
    with ``quantize_lm_head``, after them); return the report.

    ``config`` is an :class:`~spqr_hf.config.SpQRConfig` (engine settings, ``true_sequential``,
    ``modules_to_not_convert``, ``block_name_to_quantize``, ``device``); ``windows`` are the
    calibration token ids ``[nsamples, seqlen]``. Records each layer's outlier count in
    ``config.quantized_layers`` so the checkpoint can be rebuilt before its weights load.
    """
    start = time.perf_counter()
    params = config.engine_params()
    block_name, blocks = find_block_list(model, getattr(config, "block_name_to_quantize", None))
    device = calibration_device(getattr(config, "device", None))
    if batch_size is None:
        batch_size = getattr(config, "batch_size", None) or _default_batch_size(windows.shape[1], windows.shape[0])
    activation_device = device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
        need = windows.numel() * hidden_size * torch.finfo(model.dtype).bits // 8
        activation_device = device if need < free // 3 else torch.device("cpu")
    skip = list(getattr(config, "modules_to_not_convert", None) or [])
    report = QuantizationReport(params=params)
    quantized_layers: dict[str, int] = {}

    hidden, calls, tuple_len = capture_block_inputs(model, block_name, blocks, windows, batch_size, device,
                                                    activation_device)
    compute_dtype = calibration_dtype(getattr(config, "calibration_dtype", "auto"), model, device)
    hidden = [h.to(compute_dtype) for h in hidden]
    calls = [_cast_call(call, compute_dtype) for call in calls]
    group_cache: dict[frozenset, list[list[str]]] = {}
    for index, block in enumerate(tqdm(blocks, desc="SpQR blocks", disable=not progress)):
        home = next(iter(block.parameters())).device
        block.to(device)
        linears = {name: layer for name, layer in find_linears(block).items()
                   if not is_skipped(f"{block_name}.{index}.{name}", skip)}
        # Calibration passes run on a copy in the compute dtype (bfloat16 matmuls are ~3x faster
        # on CPUs with AVX512-BF16, and GPU calibration is fp16/bf16 anyway); the engine always
        # quantizes the original weights.
        work = block if _block_dtype(block) == compute_dtype else copy.deepcopy(block).to(compute_dtype)
        work_linears = {name: work.get_submodule(name) for name in linears}
        results: dict[str, SpQRResult] = {}
        groups: list[list[str]] = []
        if linears:
            key = frozenset(linears)
            if key not in group_cache:
                group_cache[key] = discover_groups(work, work_linears, hidden[0], calls[0], index, device)
            groups = group_cache[key]
        cache = FrozenChildCache(work, [name for group in groups for name in group])
        if groups:
            stages = [[g] for g in groups] if getattr(config, "true_sequential", True) else [groups]
            bar = tqdm(total=sum(len(g) for g in groups), desc=f"block {index}", leave=False, disable=not progress)
            for stage in stages:
                hessians = _accumulate(work, work_linears, stage, hidden, calls, index, device, cache)
                for group in stage:
                    hessian = hessians.pop(group[0]).hessian
                    weights = [weight_matrix(linears[name]) for name in group]
                    group_results, seconds = _quantize_group(weights, hessian, params, layer_quantizer)
                    for name, weight, result in zip(group, weights, group_results, strict=True):
                        recon = _reconstruction(result)
                        set_weight_matrix(work_linears[name], recon)
                        results[name] = result
                        cache.final.add(name)
                        report.layers.append(_layer_report(f"{block_name}.{index}.{name}", weight, recon, hessian,
                                                           result, seconds))
                        quantized_layers[report.layers[-1].name] = result.packed.nnz
                        bar.update(1)
            bar.close()
        cache.store_outputs = False  # the final pass is the last one: replay, store nothing new
        for i, (state, call) in enumerate(zip(hidden, calls, strict=True)):
            cache.begin_pass(i)
            hidden[i] = first_tensor(_run_block(work, state, call, index, device)).to(activation_device)
        cache.close()
        for name, result in results.items():
            _set_module(block, name, _packed_module(linears[name], result))
        del work, work_linears
        block.to(home)
    if not report.layers:
        raise ValueError(
            f"no linear layer inside {block_name} was quantized (all skipped by modules_to_not_convert={skip}?)"
        )
    if getattr(config, "quantize_lm_head", False):
        hessian = output_layer_hessian(model, block_name, blocks, windows, batch_size, hidden, tuple_len, device)
        del hidden, calls
        _quantize_output_layer(model, hessian, params, device, layer_quantizer, report, quantized_layers)
    report.seconds = time.perf_counter() - start
    config.quantized_layers = {**(getattr(config, "quantized_layers", None) or {}), **quantized_layers}
    config.quantization_summary = report.summary()
    logger.info(report.summary_line())
    return report
