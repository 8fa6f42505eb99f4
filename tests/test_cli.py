"""The ``spqr-hf`` console script: quantize, generate, and clean errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from spqr_hf.cli import build_parser, main
from spqr_hf.hf.tiny import save_tiny_model, synthetic_text


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    source = save_tiny_model(root / "fp", "qwen2", seed=9)
    text = root / "calib.txt"
    text.write_text("\n".join(synthetic_text(200, seed=5)))
    out, report = root / "q", root / "report.json"
    code = main(["quantize", source, str(out), "--dataset", str(text), "--bits", "4", "--nsamples", "4",
                 "--seqlen", "32", "--outlier-threshold", "inf", "--quantize-lm-head", "--report", str(report)])
    assert code == 0
    return out, report, source, text


def test_quantize_writes_checkpoint_tokenizer_and_report(quantized_dir, capsys):
    out, report, _, _ = quantized_dir
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["outlier_threshold"] == "inf" and config["quantized_layers"]
    assert config["quantize_lm_head"] is True and "lm_head" in config["quantized_layers"]
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()
    data = json.loads(report.read_text())
    assert len(data["layers"]) == len(config["quantized_layers"])
    assert data["summary"]["outlier_fraction"] == 0  # tau = inf keeps no outliers
    assert all(0 <= layer["relative_error"] < 1 for layer in data["layers"])


def test_generate_prints_continuations(quantized_dir, capsys):
    out, _, _, _ = quantized_dir
    assert main(["generate", str(out), "The farmer", "A quiet student explains", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("The farmer") and lines[1].startswith("A quiet student explains")


def test_bad_input_is_a_clean_error_and_writes_nothing(quantized_dir, tmp_path, capsys):
    _, _, source, _ = quantized_dir
    short = tmp_path / "short.txt"
    short.write_text("far too little text")
    code = main(["quantize", source, str(tmp_path / "out"), "--dataset", str(short), "--nsamples", "4",
                 "--seqlen", "32"])
    assert code == 2
    assert "provide more text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parser_lists_subcommands_and_rejects_bad_options():
    parser = build_parser()
    assert {"quantize", "generate", "eval"} <= set(parser._subparsers._group_actions[0].choices)
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "m", "o", "--dataset", "d", "--outlier-threshold", "-1"])


@pytest.mark.skipif(shutil.which("spqr-hf") is None, reason="spqr-hf console script not installed (pip install -e .)")
def test_console_script_is_installed():
    result = subprocess.run(["spqr-hf", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "quantize" in result.stdout and "generate" in result.stdout


def test_eval_prints_the_same_perplexity_as_the_library(quantized_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spqr_hf.evaluation import perplexity, tokenize_text

    out, _, source, text = quantized_dir
    scores = {}
    for name, folder in (("quantized", out), ("float", source)):
        assert main(["eval", str(folder), "--text", str(text), "--seqlen", "32", "--windows", "3", "--json"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["windows"] == 3 and record["seqlen"] == 32
        scores[name] = record["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = tokenize_text(AutoTokenizer.from_pretrained(str(out)), text.read_text())
    assert scores["quantized"] == pytest.approx(perplexity(model, ids, 32, 3, progress=False), rel=1e-6)
    assert 1 < scores["float"] and 1 < scores["quantized"]
    assert main(["eval", str(out), "--text", str(text.parent / "missing.txt")]) == 2
