"""Calibration samples: every supported ``dataset`` form becomes one ``[nsamples, seqlen]`` token tensor.

Accepted forms (checked before any model weight is touched):

* a list of strings;
* a path to a ``.txt`` file, a ``.jsonl`` file (``"text"`` field per line) or a folder of them;
* a ``datasets.Dataset`` (its ``"text"`` column, or its only string column);
* pre-tokenized ids: a 2-D tensor (each row is one window) or a 1-D tensor / list of ids / list
  of tensors or ``{"input_ids": ...}`` dicts (concatenated into one stream, then windowed);
* a dataset name: ``"wikitext2"``, ``"c4"`` (through optimum's GPTQ loaders) or ``"redpajama"``,
  downloaded with ``datasets`` (needs network access).

Text is joined, tokenized once, cut into non-overlapping ``seqlen`` windows, and ``nsamples`` of
them are drawn at random with ``seed``: reproducible, and no token is used twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

NAMED_DATASETS = ("wikitext2", "c4", "c4-new", "redpajama")
_LOCAL_HINT = (
    "Pass local text instead: dataset=[\"some text\", ...], a path to a .txt/.jsonl file or folder, "
    "or a datasets.Dataset with a 'text' column"
)


class CalibrationDataError(ValueError):
    """The calibration data cannot provide ``nsamples`` windows of ``seqlen`` tokens."""


def load_texts(path: str | os.PathLike) -> list[str]:
    """Texts of a .txt file (one text), a .jsonl file (``text`` field of each line), or a folder of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise CalibrationDataError(f"calibration folder {path} contains no .txt or .jsonl files")
        return [text for file in files for text in load_texts(file)]
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CalibrationDataError(f"{path}:{number} is not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CalibrationDataError(f"{path}:{number} has no string field 'text'")
                texts.append(record["text"])
        return texts
    return [path.read_text(encoding="utf-8")]


def _dataset_texts(dataset: Any) -> list[str]:
    columns = dataset.column_names
    if "text" in columns:
        return list(dataset["text"])
    string_columns = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(string_columns) == 1:
        return list(dataset[string_columns[0]])
    raise CalibrationDataError(f"the calibration Dataset needs a 'text' column (it has {columns})")


def _windows_from_stream(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    available = ids.numel() // seqlen
    if available < nsamples:
        raise CalibrationDataError(
            f"the calibration {what} has {ids.numel()} tokens, enough for {available} windows of seqlen={seqlen} "
            f"but nsamples={nsamples} are needed ({nsamples * seqlen} tokens): provide more text, "
            "or lower nsamples / seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=gen)[:nsamples].sort().values
    return ids[: available * seqlen].view(available, seqlen)[chosen].clone()


def _token_stream(dataset: Sequence[Any]) -> torch.Tensor:
    parts = []
    for item in dataset:
        if isinstance(item, dict):
            item = item["input_ids"]
        parts.append(torch.as_tensor(item).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _is_token_list(dataset: Any) -> bool:
    if not isinstance(dataset, (list, tuple)) or not dataset:
        return False
    first = dataset[0]
    if isinstance(first, list):
        return bool(first) and isinstance(first[0], int)
    return isinstance(first, (int, torch.Tensor, dict))


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object from an object or a name / local path (loaded with ``AutoTokenizer``)."""
    if tokenizer is None or tokenizer == "":
        raise CalibrationDataError(
            "calibration text needs a tokenizer: pass SpQRConfig(tokenizer=...) (object or name)"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except Exception as err:  # noqa: BLE001
            raise CalibrationDataError(
                f"could not load a tokenizer from {os.fspath(tokenizer)!r} ({type(err).__name__}); "
                "pass SpQRConfig(tokenizer=<tokenizer object or name>)"
            ) from err
    return tokenizer


def _named_dataset(name: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    tokenizer = resolve_tokenizer(tokenizer)
    try:
        if name == "redpajama":
            from datasets import load_dataset

            data = load_dataset("togethercomputer/RedPajama-Data-1T-Sample", split="train")
            texts = [data[i]["text"] for i in torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[
                : max(nsamples * 4, 64)].tolist()]
            return tokenize_windows(texts, tokenizer, nsamples, seqlen, seed)
        from optimum.gptq.data import get_dataset

        samples = get_dataset(name, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
        return torch.cat([s["input_ids"].reshape(1, -1)[:, :seqlen] for s in samples])
    except CalibrationDataError:
        raise
    except Exception as err:  # noqa: BLE001 - offline / hub errors come in many types
        raise CalibrationDataError(
            f"could not load the calibration dataset {name!r} ({type(err).__name__}: {str(err)[:200]}); "
            f"downloading it needs network access. {_LOCAL_HINT}"
        ) from err


def tokenize_windows(texts: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Join ``texts``, tokenize once, and draw ``nsamples`` non-overlapping windows of ``seqlen`` tokens."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise CalibrationDataError(f"the calibration dataset is empty (no non-blank text); {_LOCAL_HINT}")
    tokenizer = resolve_tokenizer(tokenizer)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long, device="cpu").reshape(-1)
    return _windows_from_stream(ids, nsamples, seqlen, seed, "text")


def check_sizes(nsamples: Any, seqlen: Any) -> None:
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CalibrationDataError(f"{name} must be a positive integer, got {value!r}")


def get_calibration_data(
    dataset: Any, tokenizer: Any = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> torch.Tensor:
    """Token windows ``[nsamples, seqlen]`` (int64) from any supported ``dataset`` form (see module doc)."""
    check_sizes(nsamples, seqlen)
    if dataset is None:
        raise CalibrationDataError(
            "quantizing needs calibration data: pass SpQRConfig(dataset=...), e.g. a list of texts, a .txt/.jsonl "
            "path, a datasets.Dataset, token ids, or 'wikitext2' / 'c4' / 'redpajama' when online"
        )
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point():
            raise CalibrationDataError("pre-tokenized calibration data must be integer token ids")
        if dataset.dim() == 2:
            if dataset.shape[0] < nsamples or dataset.shape[1] < seqlen:
                raise CalibrationDataError(
                    f"pre-tokenized calibration windows have shape {tuple(dataset.shape)}; need at least "
                    f"[nsamples={nsamples}, seqlen={seqlen}]: provide more windows or lower nsamples / seqlen"
                )
            return dataset[:nsamples, :seqlen].to(torch.long).clone()
        return _windows_from_stream(dataset.reshape(-1).to(torch.long), nsamples, seqlen, seed, "token ids")
    if isinstance(dataset, (str, os.PathLike)):
        text = os.fspath(dataset)
        if text in NAMED_DATASETS:
            return _named_dataset(text, tokenizer, nsamples, seqlen, seed)
        if os.path.exists(text):
            return tokenize_windows(load_texts(text), tokenizer, nsamples, seqlen, seed)
        raise CalibrationDataError(
            f"dataset={text!r} is neither an existing file or folder nor one of {', '.join(NAMED_DATASETS)}; "
            f"{_LOCAL_HINT}"
        )
    if hasattr(dataset, "column_names") and hasattr(dataset, "features"):
        return tokenize_windows(_dataset_texts(dataset), tokenizer, nsamples, seqlen, seed)
    if _is_token_list(dataset):
        return _windows_from_stream(_token_stream(dataset).to(torch.long), nsamples, seqlen, seed, "token ids")
    if isinstance(dataset, (list, tuple)):
        if dataset and not all(isinstance(t, str) for t in dataset):
            raise CalibrationDataError("a calibration list must hold only strings (or only token ids)")
        return tokenize_windows(list(dataset), tokenizer, nsamples, seqlen, seed)
    raise CalibrationDataError(f"unsupported calibration dataset of type {type(dataset).__name__}; {_LOCAL_HINT}")
