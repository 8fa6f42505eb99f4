"""Calibration data forms and the block-sequential driver, on tiny local models."""

from __future__ import annotations

import json

import pytest
import torch

from spqr_hf import SpQRConfig, SpQRLinear
from spqr_hf.calibrate import CalibrationDataError, find_block_list, get_calibration_data, quantize_model
from spqr_hf.calibrate.sequential import spqr_layer_quantizer
from spqr_hf.core import round_to_nearest
from spqr_hf.hf.tiny import synthetic_text, tiny_model, tiny_tokenizer

TEXT = synthetic_text(200, seed=4)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_text_forms_agree(tok, tmp_path):
    from datasets import Dataset

    (tmp_path / "a.txt").write_text("\n\n".join(TEXT))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part.txt").write_text("\n\n".join(TEXT))
    reference = get_calibration_data(TEXT, tok, nsamples=6, seqlen=32, seed=1)
    assert reference.shape == (6, 32) and reference.dtype == torch.long
    for form in (str(tmp_path / "a.txt"), str(tmp_path / "folder"), Dataset.from_dict({"text": TEXT})):
        assert torch.equal(get_calibration_data(form, tok, nsamples=6, seqlen=32, seed=1), reference)
    jsonl = get_calibration_data(str(tmp_path / "b.jsonl"), tok, nsamples=6, seqlen=32, seed=1)
    assert jsonl.shape == (6, 32)


def test_windows_are_distinct_reproducible_and_seeded(tok):
    ids = torch.tensor(tok("\n\n".join(TEXT), add_special_tokens=False, verbose=False)["input_ids"])
    a = get_calibration_data(TEXT, tok, nsamples=8, seqlen=16, seed=3)
    assert torch.equal(a, get_calibration_data(TEXT, tok, nsamples=8, seqlen=16, seed=3))
    assert not torch.equal(a, get_calibration_data(TEXT, tok, nsamples=8, seqlen=16, seed=4))
    windows = ids[: ids.numel() // 16 * 16].view(-1, 16)
    rows = [int((windows == row).all(1).nonzero()[0]) for row in a]  # every window is an aligned chunk of the text
    assert len(set(rows)) == 8, "no window is used twice"


def test_token_forms():
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(3, 300, (1000,), generator=gen)
    rows = torch.randint(3, 300, (5, 40), generator=gen)
    assert torch.equal(get_calibration_data(rows, None, nsamples=4, seqlen=32), rows[:4, :32])
    from_stream = get_calibration_data(stream, None, nsamples=4, seqlen=32, seed=0)
    from_list = get_calibration_data([{"input_ids": stream[:500]}, stream[500:]], None, nsamples=4, seqlen=32, seed=0)
    assert torch.equal(from_stream, from_list)
    with pytest.raises(CalibrationDataError, match="tokenizer"):
        get_calibration_data(["text"], None, nsamples=1, seqlen=4)
    with pytest.raises(CalibrationDataError, match="positive integer"):
        get_calibration_data(rows, None, nsamples=0, seqlen=4)


def _config(**overrides):
    return SpQRConfig(**{"bits": 3, "nsamples": 8, "seqlen": 32, **overrides})


def test_hessians_match_float64_reference_and_groups_share_inputs(tok):
    model = tiny_model("llama", seed=2)
    windows = get_calibration_data(TEXT, tok, nsamples=8, seqlen=32)
    reference = {}
    layer0 = model.model.layers[0]
    hooks = [layer0.self_attn.q_proj.register_forward_pre_hook(lambda m, a: reference.setdefault("qkv", a[0])),
             layer0.mlp.gate_proj.register_forward_pre_hook(lambda m, a: reference.setdefault("mlp", a[0]))]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    seen = []

    def recording(weight, hessian, params):
        seen.append(hessian.clone())
        return spqr_layer_quantizer(weight, hessian, params)

    quantize_model(model, _config(calibration_dtype="float32"), windows, layer_quantizer=recording, batch_size=3,
                   progress=False)
    assert len(seen) == 14
    x = reference["qkv"].double().reshape(-1, 64)
    expected = (2 / x.shape[0] * x.T @ x).float()
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-5)
    assert seen[0] is not seen[1] and torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2]), \
        "q, k and v share one Hessian"
    assert torch.equal(seen[4], seen[5]), "gate and up share one Hessian"
    assert not torch.equal(seen[3], seen[0])


@pytest.mark.parametrize("true_sequential", [True, False])
def test_spqr_beats_rtn_through_the_same_driver(tok, true_sequential):
    windows = get_calibration_data(TEXT, tok, nsamples=8, seqlen=32)
    results = {}
    for name, quantizer in (("spqr", spqr_layer_quantizer), ("rtn", lambda w, h, p: round_to_nearest(w, p))):
        model = tiny_model("opt", seed=6)
        config = _config(outlier_threshold=float("inf"), true_sequential=true_sequential)
        report = quantize_model(model, config, windows, layer_quantizer=quantizer, progress=False)
        results[name] = report.summary()["mean_relative_error"]
        assert sum(isinstance(m, SpQRLinear) for m in model.modules()) == 12  # q,k,v,out_proj,fc1,fc2 x 2
        assert config.quantized_layers and config.quantization_summary["layers"] == 12
    assert results["spqr"] < results["rtn"], results


def test_skip_modules_and_summary_line(tok, caplog):
    model = tiny_model("gpt_neox", seed=1)
    windows = get_calibration_data(TEXT, tok, nsamples=4, seqlen=32)
    config = _config(nsamples=4, modules_to_not_convert=["mlp.dense_4h_to_h"])
    with caplog.at_level("INFO", logger="spqr_hf"):
        report = quantize_model(model, config, windows, progress=False)
    names = {layer.name for layer in report.layers}
    assert names and not any("dense_4h_to_h" in n for n in names)
    assert type(model.gpt_neox.layers[0].mlp.dense_4h_to_h).__name__ == "Linear"
    lines = [r.getMessage() for r in caplog.records]
    assert any("relative error" in line and "outliers" in line for line in lines)
    assert "average bits" in lines[-1] and "(stored)" in lines[-1] and "wall time" in lines[-1]
    summary = report.summary()
    assert summary["avg_bits_stored"] > 3 and 0 < summary["outlier_fraction"] < 0.2


def test_bfloat16_calibration_passes_stay_close_to_float32(tok):
    """Calibration forwards may run in bfloat16 (fast on CPUs with AVX512-BF16): the first
    Hessian (block 0's inputs, bfloat16-rounded) stays within 1% of the float32 one, the engine
    still sees float32 weights, and the model keeps its dtype. Deeper layers of a random tiny
    model amplify the rounding, so the real-model test checks quality end to end instead."""
    windows = get_calibration_data(TEXT, tok, nsamples=8, seqlen=32)
    hessians = {}
    for dtype in ("float32", "bfloat16"):
        seen = []

        def recording(weight, hessian, params, seen=seen):
            assert weight.dtype == torch.float32
            seen.append(hessian.clone())
            return spqr_layer_quantizer(weight, hessian, params)

        model = tiny_model("llama", seed=2)
        quantize_model(model, _config(calibration_dtype=dtype), windows, layer_quantizer=recording, progress=False)
        hessians[dtype] = seen
        assert next(model.parameters()).dtype == torch.float32  # the model itself keeps its dtype
    assert len(hessians["float32"]) == len(hessians["bfloat16"]) == 14
    first32, first16 = hessians["float32"][0], hessians["bfloat16"][0]
    assert float((first16 - first32).norm() / first32.norm()) < 0.01
    assert all(bool(torch.isfinite(h).all()) for h in hessians["bfloat16"])
    with pytest.raises(ValueError, match="calibration_dtype"):
        _config(calibration_dtype="int8")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_replaying_finished_children_changes_nothing(tok, arch, monkeypatch):
    """Outputs of block children whose linears are final are replayed in later passes, and
    attention's output is rebuilt from the kept input of its last linear; the quantized model
    must be bit-identical to one calibrated without those shortcuts."""
    from spqr_hf.calibrate import replay as replay_module

    windows = get_calibration_data(TEXT, tok, nsamples=6, seqlen=32)
    tail_replays = []
    rebuild = replay_module.FrozenChildCache._replay_tail
    monkeypatch.setattr(replay_module.FrozenChildCache, "_replay_tail",
                        lambda self, name, tail: tail_replays.append(name) or rebuild(self, name, tail))
    packed = {}
    for replay in (True, False):
        monkeypatch.setattr(replay_module, "CACHE_FROZEN_CHILDREN", replay)
        model = tiny_model(arch, seed=3)
        quantize_model(model, _config(calibration_dtype="float32"), windows, batch_size=2, progress=False)
        packed[replay] = {name: module.packed.tensors() for name, module in model.named_modules()
                          if isinstance(module, SpQRLinear)}
    # 3 batches per block: the first checks that attention returns its last linear's output, the
    # other two are rebuilt from that linear's kept input (only while the shortcut is on)
    assert len(tail_replays) == 2 * len(find_block_list(model)[1]), tail_replays
    assert packed[True].keys() == packed[False].keys() and len(packed[True]) >= 8
    for name, tensors in packed[True].items():
        assert all(torch.equal(t, packed[False][name][k]) for k, t in tensors.items()), name


def test_weight_matrix_is_a_copy_even_in_float32():
    """The driver keeps the original weight for its error report while it overwrites the layer: with a
    float32 model calibrated in float32 (CPUs without fast bfloat16) an alias made every error 0."""
    from spqr_hf.calibrate.blocks import set_weight_matrix, weight_matrix

    layer = torch.nn.Linear(8, 4)
    original = weight_matrix(layer)
    before = original.clone()
    set_weight_matrix(layer, torch.randn(4, 8))
    assert torch.equal(original, before) and not torch.equal(layer.weight.detach(), before)
