"""Calibration data: load text through `datasets`, tokenize, pack or truncate, sample, batch.

The pipeline is ``load_texts -> tokenize_samples -> make_batches``;
:func:`build_calibration_batches` runs all three. Adapters for the quantizers turn samples into
GPTQModel's list of dicts (:func:`to_gptqmodel_examples`) or into a tokenized
``datasets.Dataset`` for llm-compressor's ``oneshot`` (:func:`to_hf_dataset`).

``datasets`` is imported lazily, so importing this module (and validating a config) works
without it installed.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from defuser_quant.core.errors import DefuserQuantError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

__all__ = [
    "BUILTIN_CORPORA",
    "CalibrationDataConfig",
    "CalibrationDataError",
    "build_calibration_batches",
    "build_calibration_samples",
    "build_gptqmodel_examples",
    "build_llmcompressor_dataset",
    "load_texts",
    "make_batches",
    "resolve_builtin",
    "sample_order",
    "tokenize_samples",
    "to_gptqmodel_examples",
    "to_hf_dataset",
]

logger = logging.getLogger(__name__)

#: Names accepted after ``builtin:``; each maps split -> file name inside the corpus folder.
BUILTIN_CORPORA: dict[str, dict[str, str]] = {
    "pydoc": {
        "train": "train.txt",
        "heldout": "heldout.txt",
        "validation": "heldout.txt",
        "test": "heldout.txt",
    },
}

#: File extension -> ``datasets`` packaged builder.
_BUILDERS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_TOKENIZE_CHUNK = 256


class CalibrationDataError(DefuserQuantError, RuntimeError):
    """Calibration data could not be loaded, tokenized or batched."""


class CalibrationDataConfig(BaseModel):
    """Where calibration text comes from and how it becomes token samples.

    ``source`` is a file path, glob, directory, ``builtin:<name>``, ``hf:<hub name>`` (or a bare
    hub name such as ``allenai/c4`` that is not a local path), or a ``datasets.Dataset`` /
    ``DatasetDict`` object.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, populate_by_name=True
    )

    source: Any = Field(
        default="builtin:pydoc",
        description="Path, glob, directory, builtin:<name>, hf:<name>, or a datasets object.",
    )
    split: str = Field(default="train", description="Split of a hub dataset, DatasetDict or builtin corpus.")
    config_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("config_name", "subset"),
        description="Hub dataset configuration (subset) name.",
    )
    revision: str | None = Field(default=None, description="Hub dataset revision.")
    text_field: str = Field(default="text", description="Column holding the text (JSON/CSV/parquet/datasets).")
    text_sample_by: Literal["line", "paragraph", "document"] = Field(
        default="paragraph", description="How plain-text files are split into texts."
    )
    num_samples: int | None = Field(default=128, gt=0, description="Samples to draw; None takes all.")
    seq_len: int = Field(default=512, gt=0, description="Tokens per sample (pack) or at most (truncate).")
    mode: Literal["pack", "truncate"] = Field(default="pack", description="Pack texts into blocks or truncate each.")
    min_tokens: int = Field(
        default=16, gt=0, description="truncate mode: drop texts shorter than this (capped at seq_len)."
    )
    seed: int = Field(default=0, description="Seed of the text order; same seed, same samples.")
    shuffle: bool = Field(default=True, description="Shuffle texts by seed before sampling.")
    batch_size: int = Field(default=1, gt=0, description="Samples per batch.")
    padding_side: Literal["left", "right"] | None = Field(
        default=None, description="Padding side; None uses the tokenizer's (right if unset)."
    )
    chat_template: bool = Field(default=False, description="Wrap each text as a user message in the chat template.")
    add_special_tokens: bool = Field(
        default=True, description="truncate mode: let the tokenizer add BOS/EOS (off under a chat template)."
    )
    cache_dir: str | None = Field(default=None, description="datasets cache folder.")
    hub_timeout: float = Field(default=5.0, gt=0, description="Seconds to wait for the hub reachability probe.")

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError("source must not be empty")
            if value.startswith("builtin:"):
                name = value[len("builtin:"):]
                if name not in BUILTIN_CORPORA:
                    raise ValueError(
                        f"unknown builtin corpus {name!r}; known: {', '.join(sorted(BUILTIN_CORPORA))}"
                    )
            if value.startswith("hf:") and not value[3:].strip():
                raise ValueError("hf: needs a dataset name, e.g. hf:allenai/c4")
            return value
        if _is_datasets_object(value):
            return value
        raise ValueError(
            "source must be a path, glob, directory, 'builtin:<name>', 'hf:<name>', "
            f"or a datasets.Dataset / DatasetDict, not {type(value).__name__}"
        )

    @field_validator("text_field", "split")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check_builtin_split(self) -> CalibrationDataConfig:
        if isinstance(self.source, str) and self.source.startswith("builtin:"):
            splits = BUILTIN_CORPORA[self.source[len("builtin:"):]]
            if self.split not in splits:
                raise ValueError(
                    f"split {self.split!r} is not available for {self.source}; "
                    f"known: {', '.join(sorted(splits))}"
                )
        return self


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def _is_datasets_object(value: Any) -> bool:
    module = type(value).__module__ or ""
    if not module.startswith("datasets"):
        return False
    from datasets import Dataset, DatasetDict

    return isinstance(value, (Dataset, DatasetDict))


def resolve_builtin(name: str, split: str = "train") -> Path:
    """Path of a shipped corpus file (``name`` with or without ``builtin:``); errors if missing."""
    name = name[len("builtin:"):] if name.startswith("builtin:") else name
    if name not in BUILTIN_CORPORA:
        raise CalibrationDataError(
            f"unknown builtin corpus {name!r}; known: {', '.join(sorted(BUILTIN_CORPORA))}"
        )
    files = BUILTIN_CORPORA[name]
    if split not in files:
        raise CalibrationDataError(
            f"builtin:{name} has no split {split!r}; known: {', '.join(sorted(files))}"
        )
    from defuser_quant.assets import CORPUS_DIR

    path = CORPUS_DIR / files[split]
    if not path.is_file():
        raise CalibrationDataError(
            f"builtin corpus file {path} is missing (builtin:{name}, split {split!r}); "
            "reinstall defuser-quant or pass a local text file as source"
        )
    return path


def _builder_for(path: str) -> str | None:
    lower = path.lower()
    for suffix in _COMPRESSION:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    return _BUILDERS.get(os.path.splitext(lower)[1])


def _local_files(source: str) -> list[str] | None:
    """Files named by a path, glob or directory; None when the source is not local."""
    expanded = os.path.expanduser(source)
    if os.path.isfile(expanded):
        return [expanded]
    if os.path.isdir(expanded):
        found = sorted(
            p for p in glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
            if os.path.isfile(p) and _builder_for(p) is not None
        )
        if not found:
            raise CalibrationDataError(
                f"directory {source} holds no supported files "
                f"({', '.join(sorted(_BUILDERS))}, optionally compressed)"
            )
        return found
    if _GLOB_CHARS.search(expanded):
        found = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not found:
            raise CalibrationDataError(f"glob {source!r} matches no files")
        return found
    return None


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or _builder_for(source) is not None
    )


def _load_local(files: list[str], cfg: CalibrationDataConfig) -> Dataset:
    from datasets import load_dataset

    builders = {_builder_for(f) for f in files}
    if None in builders:
        bad = [f for f in files if _builder_for(f) is None]
        raise CalibrationDataError(
            f"unsupported file type: {bad[0]}; supported: {', '.join(sorted(_BUILDERS))}"
        )
    if len(builders) > 1:
        raise CalibrationDataError(
            f"files of different kinds in one source ({', '.join(sorted(b for b in builders if b))}); "
            "use one format per source"
        )
    builder = builders.pop()
    assert builder is not None
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["sample_by"] = cfg.text_sample_by
    elif builder == "csv" and all(".tsv" in f.lower() for f in files):
        kwargs["sep"] = "\t"
    logger.info("loading %d %s file(s) with datasets (%s)", len(files), builder, files[0])
    try:
        return load_dataset(builder, data_files=files, split="train", cache_dir=cfg.cache_dir, **kwargs)
    except Exception as exc:  # datasets raises many kinds for malformed files
        raise CalibrationDataError(f"could not read {builder} file(s) {files[0]}...: {exc}") from exc


def _offline_flag() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    try:
        import datasets.config as dconfig

        if getattr(dconfig, "HF_HUB_OFFLINE", False):
            return "datasets offline mode"
    except ImportError:  # pragma: no cover
        pass
    return None


def _hub_endpoint() -> str:
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except ImportError:  # pragma: no cover
            endpoint = "https://huggingface.co"
    return endpoint


def _probe_hub(timeout: float) -> str | None:
    """Reason the hub is unreachable, or None if it answered (or a proxy hides the answer)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = _hub_endpoint()
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return None
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot connect to {endpoint} ({exc})"


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, no connection), or None."""
    flag = _offline_flag()
    if flag:
        return f"offline mode: {flag}"
    return _probe_hub(timeout)


def _is_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, (ConnectionError, TimeoutError, socket.gaierror)) or name in {
            "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "LocalEntryNotFoundError",
        }:
            return True
        current = current.__cause__ or current.__context__
    return False


def _unreachable(name: str, why: str, bare: bool = False) -> CalibrationDataError:
    local = f"No local file or directory named {name!r} exists. " if bare else ""
    return CalibrationDataError(
        f"hub dataset {name!r} requested but the Hugging Face hub is unreachable ({why}). {local}"
        "Pass a local file, glob or directory (text/JSON/JSONL/CSV/parquet), a datasets.Dataset, "
        "or 'builtin:pydoc' as source."
    )


def _load_hub(name: str, cfg: CalibrationDataConfig, bare: bool = False) -> Any:
    flag = _offline_flag()
    if flag:
        raise _unreachable(name, f"offline mode: {flag}", bare)
    why = _probe_hub(cfg.hub_timeout)
    if why:
        raise _unreachable(name, why, bare)
    from datasets import load_dataset

    logger.info("loading hub dataset %s (config %s, split %s)", name, cfg.config_name, cfg.split)
    try:
        return load_dataset(
            name, cfg.config_name, split=cfg.split, cache_dir=cfg.cache_dir, revision=cfg.revision
        )
    except Exception as exc:
        if _is_connection_error(exc):
            raise _unreachable(name, f"{type(exc).__name__}: {exc}", bare) from exc
        local = f" (and no local path named {name!r} exists)" if bare else ""
        raise CalibrationDataError(f"could not load hub dataset {name!r}{local}: {exc}") from exc


def _select_split(ds: Any, split: str, what: str) -> Any:
    from datasets import DatasetDict

    if not isinstance(ds, DatasetDict):
        return ds
    if split in ds:
        return ds[split]
    if len(ds) == 1:
        only = next(iter(ds))
        logger.info("%s has one split %r; using it instead of %r", what, only, split)
        return ds[only]
    raise CalibrationDataError(f"split {split!r} not in {what}; available splits: {', '.join(ds)}")


def _column_texts(ds: Any, field: str, what: str) -> list[str]:
    columns = list(ds.column_names)
    if field not in columns:
        raise CalibrationDataError(
            f"text_field {field!r} not found in {what}; available columns: {', '.join(columns)}"
        )
    texts: list[str] = []
    skipped = 0
    for i, value in enumerate(ds[field]):
        if value is None:
            skipped += 1
            continue
        if not isinstance(value, str):
            raise CalibrationDataError(
                f"column {field!r} of {what} holds {type(value).__name__} (row {i}), not text; "
                f"choose a text column among: {', '.join(columns)}"
            )
        if value.strip():
            texts.append(value)
        else:
            skipped += 1
    if skipped:
        logger.debug("skipped %d empty texts in %s", skipped, what)
    return texts


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")
    )


def _open_source(cfg: CalibrationDataConfig) -> tuple[Any, str, str]:
    """The dataset named by ``cfg.source``, the column to read, and a description for errors."""
    source = cfg.source
    if not isinstance(source, str):
        return _select_split(source, cfg.split, "the given DatasetDict"), cfg.text_field, "the given dataset"
    if source.startswith("builtin:"):
        path = resolve_builtin(source, cfg.split)
        return _load_local([str(path)], cfg), "text", source
    if source.startswith("hf:"):
        name = source[3:].strip()
        return _select_split(_load_hub(name, cfg), cfg.split, f"hub dataset {name!r}"), cfg.text_field, source
    local = os.path.expanduser(source)
    if _is_saved_dataset(local):
        from datasets import load_from_disk

        logger.info("loading a dataset saved with save_to_disk from %s", local)
        return _select_split(load_from_disk(local), cfg.split, source), cfg.text_field, source
    files = _local_files(source)
    if files is not None:
        field = "text" if _builder_for(files[0]) == "text" else cfg.text_field
        return _load_local(files, cfg), field, source
    if _looks_like_path(source) or not _HUB_NAME.match(source):
        raise CalibrationDataError(
            f"source {source!r} is not an existing file, directory or glob "
            "(prefix hub dataset names with 'hf:')"
        )
    ds = _select_split(_load_hub(source, cfg, bare=True), cfg.split, f"hub dataset {source!r}")
    return ds, cfg.text_field, f"hub dataset {source!r}"


def load_texts(cfg: CalibrationDataConfig) -> list[str]:
    """Load the non-empty texts of ``cfg.source`` in source order.

    Local files go through the ``datasets`` builder matching their extension (text, json,
    parquet, csv); a folder written by ``save_to_disk`` through ``load_from_disk``; hub names
    only when the hub is reachable (otherwise a :class:`CalibrationDataError` at once).
    """
    ds, field, what = _open_source(cfg)
    texts = _column_texts(ds, field, what)
    if not texts:
        raise CalibrationDataError(f"source {what} yielded no non-empty texts")
    logger.info("loaded %d texts from %s", len(texts), what)
    return texts


# --------------------------------------------------------------------------------------
# tokenizing, sampling
# --------------------------------------------------------------------------------------


def _text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of a tokenizer or a multimodal processor."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and not hasattr(tokenizer, "convert_tokens_to_ids"):
        return inner
    return tokenizer


def sample_order(n: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices ``0..n-1``, permuted by ``seed`` when ``shuffle`` (deterministic)."""
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def _chunks(items: Sequence[str], order: Sequence[int], size: int) -> Iterator[list[str]]:
    for start in range(0, len(order), size):
        yield [items[i] for i in order[start:start + size]]


def _apply_chat(texts: list[str], tokenizer: Any) -> list[str]:
    out = []
    for text in texts:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=False
        )
        out.append(rendered)
    return out


def _encode(texts: list[str], tokenizer: Any, *, special: bool, max_length: int | None) -> list[list[int]]:
    kwargs: dict[str, Any] = {"add_special_tokens": special, "verbose": False}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    return list(tokenizer(texts, **kwargs)["input_ids"])


def tokenize_samples(texts: Sequence[str], tokenizer: Any, cfg: CalibrationDataConfig) -> list[torch.Tensor]:
    """Tokenize ``texts`` into at most ``cfg.num_samples`` 1-D ``torch.long`` samples.

    Texts are visited in an order permuted by ``cfg.seed`` (unless ``shuffle`` is off) and
    tokenized until enough samples exist, so the same seed gives the same samples.

    - ``pack``: texts are joined with the EOS token between them and cut into blocks of
      exactly ``seq_len`` tokens; the last partial block is dropped.
    - ``truncate``: one sample per text, cut to ``seq_len`` tokens; texts shorter than
      ``min(min_tokens, seq_len)`` tokens are dropped (shorter samples are padded in batches).

    With ``chat_template`` each text becomes a single user message rendered by the tokenizer's
    chat template (an error if it has none).
    """
    tok = _text_tokenizer(tokenizer)
    if cfg.chat_template and not getattr(tok, "chat_template", None):
        raise CalibrationDataError(
            "chat_template=True but the tokenizer has no chat template; "
            "set chat_template: false or use a tokenizer that defines one"
        )
    if not texts:
        raise CalibrationDataError("no texts to tokenize")
    wanted = cfg.num_samples
    order = sample_order(len(texts), cfg.seed, cfg.shuffle)
    samples: list[torch.Tensor] = []

    if cfg.mode == "pack":
        sep = tok.eos_token_id if tok.eos_token_id is not None else getattr(tok, "sep_token_id", None)
        if sep is None:
            logger.warning("tokenizer has no EOS or SEP token; packing texts without a separator")
        buffer: list[int] = []
        total = 0
        for chunk in _chunks(texts, order, _TOKENIZE_CHUNK):
            if cfg.chat_template:
                chunk = _apply_chat(chunk, tok)
            for ids in _encode(chunk, tok, special=False, max_length=None):
                buffer.extend(ids)
                total += len(ids)
                if sep is not None and (not ids or ids[-1] != sep):
                    buffer.append(sep)
                while len(buffer) >= cfg.seq_len and (wanted is None or len(samples) < wanted):
                    samples.append(torch.tensor(buffer[: cfg.seq_len], dtype=torch.long))
                    del buffer[: cfg.seq_len]
                if wanted is not None and len(samples) >= wanted:
                    break
            if wanted is not None and len(samples) >= wanted:
                break
        if not samples:
            raise CalibrationDataError(
                f"the texts hold {total} tokens, fewer than seq_len={cfg.seq_len}; "
                "lower seq_len or add text"
            )
    else:
        special = cfg.add_special_tokens and not cfg.chat_template
        min_len = min(cfg.min_tokens, cfg.seq_len)
        dropped = 0
        for chunk in _chunks(texts, order, _TOKENIZE_CHUNK):
            if cfg.chat_template:
                chunk = _apply_chat(chunk, tok)
            for ids in _encode(chunk, tok, special=special, max_length=cfg.seq_len):
                if len(ids) < min_len:
                    dropped += 1
                    continue
                samples.append(torch.tensor(ids, dtype=torch.long))
                if wanted is not None and len(samples) >= wanted:
                    break
            if wanted is not None and len(samples) >= wanted:
                break
        if dropped:
            logger.info("truncate mode: dropped %d texts shorter than %d tokens", dropped, min_len)
        if not samples:
            raise CalibrationDataError(
                f"no text reaches min_tokens={min_len} tokens; lower min_tokens or use mode 'pack'"
            )

    if wanted is not None and len(samples) < wanted:
        logger.warning(
            "asked for %d calibration samples, the data gives only %d (%s mode, seq_len %d)",
            wanted, len(samples), cfg.mode, cfg.seq_len,
        )
    logger.info("built %d calibration samples (%s, seq_len %d)", len(samples), cfg.mode, cfg.seq_len)
    return samples


# --------------------------------------------------------------------------------------
# batching and quantizer formats
# --------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any | None, pad_token_id: int | None) -> int | None:
    if pad_token_id is not None:
        return pad_token_id
    if tokenizer is None:
        return None
    tok = _text_tokenizer(tokenizer)
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id


def make_batches(
    samples: Sequence[torch.Tensor],
    batch_size: int,
    *,
    tokenizer: Any | None = None,
    pad_token_id: int | None = None,
    padding_side: Literal["left", "right"] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Group samples, in order, into padded batches of ``input_ids`` and ``attention_mask``.

    The pad id is ``pad_token_id``, else the tokenizer's pad token, else its EOS token; padding
    without any of them raises. ``padding_side`` defaults to the tokenizer's, else right.
    """
    if batch_size <= 0:
        raise CalibrationDataError(f"batch_size must be positive, got {batch_size}")
    side = padding_side or getattr(_text_tokenizer(tokenizer), "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise CalibrationDataError(f"padding_side must be 'left' or 'right', got {side!r}")
    pad = _pad_id(tokenizer, pad_token_id)
    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(samples), batch_size):
        group = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in samples[start:start + batch_size]]
        width = max(len(s) for s in group)
        if pad is None and any(len(s) != width for s in group):
            raise CalibrationDataError(
                "samples of different lengths need padding, but the tokenizer has no pad or EOS "
                "token; set tokenizer.pad_token or pass pad_token_id"
            )
        ids = torch.full((len(group), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, s in enumerate(group):
            n = len(s)
            if side == "right":
                ids[row, :n] = s
                mask[row, :n] = 1
            else:
                ids[row, width - n:] = s
                mask[row, width - n:] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def build_calibration_samples(cfg: CalibrationDataConfig, tokenizer: Any) -> list[torch.Tensor]:
    """``load_texts`` then ``tokenize_samples``: unpadded 1-D token samples."""
    return tokenize_samples(load_texts(cfg), tokenizer, cfg)


def build_calibration_batches(cfg: CalibrationDataConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """The whole pipeline: padded batches of ``input_ids`` / ``attention_mask`` tensors."""
    samples = build_calibration_samples(cfg, tokenizer)
    return make_batches(samples, cfg.batch_size, tokenizer=tokenizer, padding_side=cfg.padding_side)


def to_gptqmodel_examples(samples: Iterable[torch.Tensor]) -> list[dict[str, list[int]]]:
    """GPTQModel's calibration format: one ``{"input_ids": [...], "attention_mask": [...]}`` per sample.

    GPTQModel batches and pads these itself and drops samples of ``<= 10`` tokens by default.
    """
    out = []
    for s in samples:
        ids = torch.as_tensor(s).reshape(-1).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return out


def to_hf_dataset(samples: Iterable[torch.Tensor]) -> Dataset:
    """A tokenized ``datasets.Dataset`` (columns ``input_ids``, ``attention_mask``) for llm-compressor.

    ``oneshot(dataset=...)`` skips its own tokenization when ``input_ids`` is present.
    """
    from datasets import Dataset

    examples = to_gptqmodel_examples(samples)
    return Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in examples],
            "attention_mask": [e["attention_mask"] for e in examples],
        }
    )


def build_gptqmodel_examples(cfg: CalibrationDataConfig, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Samples from ``cfg`` in GPTQModel's list-of-dicts format."""
    return to_gptqmodel_examples(build_calibration_samples(cfg, tokenizer))


def build_llmcompressor_dataset(cfg: CalibrationDataConfig, tokenizer: Any) -> Dataset:
    """Samples from ``cfg`` as a tokenized ``datasets.Dataset`` for llm-compressor's ``oneshot``."""
    return to_hf_dataset(build_calibration_samples(cfg, tokenizer))
