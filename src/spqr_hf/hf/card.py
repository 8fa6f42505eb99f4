"""The model card section every saved SpQR checkpoint carries, and the save / push wrappers
that write it (transformers has no hook for extra files, so the two methods are wrapped on
the quantized model instance)."""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from typing import Any

BEGIN, END = "<!-- spqr_hf:begin -->", "<!-- spqr_hf:end -->"


def card_section(config: Any) -> str:
    """Markdown section: method, settings, average bits, outlier fraction, how to load."""
    summary = getattr(config, "quantization_summary", None) or {}
    tau = config.outlier_threshold
    stat = lambda bits: "float16" if bits == 16 else f"{bits}-bit"  # noqa: E731
    kept = ("The embeddings stay in full precision; the LM head is quantized too (quantize_lm_head)."
            if getattr(config, "quantize_lm_head", False) else "Embeddings and the LM head stay in full precision.")
    lines = [
        BEGIN,
        "## SpQR quantization (spqr_hf)",
        "",
        "The linear layers of the decoder blocks are quantized with **SpQR** (Sparse-Quantized Representation, "
        "Dettmers et al., ICLR 2024): GPTQ-style error feedback in small groups with quantized statistics, plus a "
        f"sparse set of exact float16 outlier weights. {kept}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| weight bits | {config.bits} |",
        f"| group size (beta1) / statistic group (beta2) | {config.groupsize} / {config.qq_groupsize} |",
        f"| scale / zero statistics | {stat(config.qq_scale_bits)} / {stat(config.qq_zero_bits)} |",
        f"| outlier threshold (tau) | {tau} |",
        f"| damping / act_order | {config.damp_percent} / {config.act_order} |",
        f"| calibration | {config.nsamples} x {config.seqlen} tokens, seed {config.seed} |",
        f"| storage format | {config.format} v{config.format_version} |",
    ]
    if summary:
        lines += [
            f"| average bits per weight (formula / stored) | {summary.get('avg_bits_formula')} / "
            f"{summary.get('avg_bits_stored')} |",
            f"| outlier fraction | {100 * float(summary.get('outlier_fraction', 0)):.3f}% |",
            f"| quantized layers | {summary.get('layers')} |",
        ]
    lines += [
        "",
        "Loading needs the `spqr_hf` package (`pip install spqr_hf`) imported before `from_pretrained`:",
        "",
        "```python",
        "import spqr_hf  # registers the SpQR loader with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")",
        "```",
        "",
        "Without `import spqr_hf`, transformers refuses this checkpoint.",
        END,
    ]
    return "\n".join(lines) + "\n"


def merge_card(existing: str | None, section: str, tags: list[str] | None = None) -> str:
    """``existing`` card text with the spqr_hf section replaced (or appended); a new card if None."""
    if existing is None:
        from huggingface_hub import ModelCard, ModelCardData

        data = ModelCardData(library_name="transformers", tags=["spqr", "spqr_hf", "quantized", *(tags or [])])
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{section}"))
    if BEGIN in existing and END in existing:
        head, _, rest = existing.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + section.rstrip("\n") + tail
    return existing.rstrip("\n") + "\n\n" + section


def _save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """transformers' save_pretrained into a temporary sibling folder, plus the card; then moved into
    place with config.json last, so an interrupted save never leaves a config pointing at partial weights."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained needs a folder, but {save_directory} is a file")
    parent = os.path.dirname(os.path.abspath(save_directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".spqr_hf-save-", dir=parent)
    try:
        result = type(self).save_pretrained(self, staging, *args, **kwargs)
        readme = os.path.join(save_directory, "README.md")
        existing = open(readme, encoding="utf-8").read() if os.path.isfile(readme) else None
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(merge_card(existing, card_section(self.config.quantization_config)))
        os.makedirs(save_directory, exist_ok=True)
        names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
        _remove_stale_weights(save_directory, set(names))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _remove_stale_weights(folder: str, keep: set[str]) -> None:
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        stale = name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))
        if stale and name not in keep:
            os.remove(os.path.join(folder, name))


def _push_to_hub(
    self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
    create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
) -> Any:
    """Like transformers' push_to_hub, but the uploaded README keeps the SpQR section: a new repo gets
    exactly what save_pretrained writes; an existing card gets the section merged in."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    from transformers.utils import hub

    repo_id = hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    try:
        existing = ModelCard.load(repo_id, token=token).content
    except (EntryNotFoundError, RepositoryNotFoundError):
        existing = None
    with tempfile.TemporaryDirectory() as tmp_dir:
        self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        section = card_section(self.config.quantization_config)
        if existing is not None or tags:
            with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(merge_card(existing, section, tags))
        return self._upload_modified_files(
            tmp_dir, repo_id, files_timestamps={}, commit_message=commit_message, token=token,
            create_pr=create_pr, revision=revision, commit_description=commit_description,
        )


def install_save_hooks(model: Any) -> None:
    """Make ``model.save_pretrained`` / ``model.push_to_hub`` write the SpQR card (this instance only)."""
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    model.push_to_hub = types.MethodType(_push_to_hub, model)


def remove_save_hooks(model: Any) -> None:
    for name in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)
