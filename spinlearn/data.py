"""Calibration and evaluation data: load text, tokenize it once, cut it into blocks.

The recipe follows GPTQ / SpinQuant for WikiText-2: join the documents with "\\n\\n", tokenize the
whole text once, then draw calibration windows at seeded random offsets and evaluate perplexity on
consecutive non-overlapping windows.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import lzma
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import datasets
import torch
from torch.utils.data import Dataset

__all__ = [
    "HUB_DATASETS",
    "SUPPORTED_EXTENSIONS",
    "TokenBlockDataset",
    "calibration_blocks",
    "eval_windows",
    "load_text",
    "tokenize_concat",
]


@dataclass(frozen=True)
class HubDataset:
    """How to fetch one known dataset from the Hugging Face hub."""

    path: str
    name: str | None = None
    text_field: str = "text"
    # split -> data file inside the repo, for repos too large to load whole (C4).
    data_files: dict[str, str] = field(default_factory=dict)
    splits: tuple[str, ...] = ("train", "validation", "test")


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1"),
    # One shard per split, as in GPTQ's get_c4: the full C4 is hundreds of GB.
    "c4": HubDataset(
        "allenai/c4",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        splits=("train", "validation"),
    ),
}

# file extension -> datasets builder; compressed variants (.gz, ...) are read transparently.
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_TRUTHY = {"1", "true", "yes", "on"}


def _builder_for(path: str) -> str:
    lower = path.lower()
    for comp in _COMPRESSION_SUFFIXES:
        if lower.endswith(comp):
            lower = lower[: -len(comp)]
            break
    ext = os.path.splitext(lower)[1]
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"unsupported data file {path!r} (extension {ext or 'none'!r}); supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)} (optionally compressed: {', '.join(_COMPRESSION_SUFFIXES)})"
        )
    return SUPPORTED_EXTENSIONS[ext]


def _hub_reachable(timeout: float = 0.5) -> bool:
    """True if a TCP connection to the hub endpoint opens within `timeout` seconds.

    Runs in a daemon thread so that a slow DNS lookup (not covered by the socket timeout) cannot
    stall the caller either.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    reached: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def _check_hub_available(source: str) -> None:
    # Without this, datasets retries for ~25-50 s before failing when the hub is unreachable.
    hint = (
        f"cannot load hub dataset {source!r}: {{why}}. Pass local files instead, e.g. "
        "data.train=/path/train.txt data.eval=/path/test.txt (.txt, .json, .jsonl or .parquet, or a glob)."
    )
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            raise ConnectionError(hint.format(why=f"{var} is set (offline mode)"))
    if not _hub_reachable():
        raise ConnectionError(hint.format(why="the Hugging Face hub is unreachable from this machine"))


def _load_hub(source: str, split: str) -> tuple[datasets.Dataset, str]:
    spec = HUB_DATASETS[source]
    if split not in spec.splits:
        raise ValueError(f"hub dataset {source!r} has splits {list(spec.splits)}, not {split!r}")
    _check_hub_available(source)
    if spec.data_files:
        ds = datasets.load_dataset(spec.path, data_files={split: spec.data_files[split]}, split=split)
    else:
        ds = datasets.load_dataset(spec.path, spec.name, split=split)
    return ds, spec.text_field


def _resolve_files(source: str) -> list[str]:
    pattern = os.path.expanduser(source)
    if os.path.isdir(pattern):
        example = os.path.join(source, "*.txt")
        raise ValueError(f"{source!r} is a directory; pass a file or a glob such as {example!r}")
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(
            f"no data file matches {source!r}. Pass an existing file or glob "
            f"({', '.join(SUPPORTED_EXTENSIONS)}) or a known hub dataset name: {', '.join(HUB_DATASETS)}"
        )
    return files


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CHECK_WHOLE_FILE_BYTES = 256 << 20  # text files up to this size are checked whole; larger ones, their start
_CHUNK = 1 << 20


def _chunks(path: str):
    """The file's (decompressed) bytes in chunks, up to _CHECK_WHOLE_FILE_BYTES (none for .zst: no stdlib codec)."""
    ext = os.path.splitext(path.lower())[1]
    if ext == ".zst":
        return
    with _OPENERS.get(ext, open)(path, "rb") as f:
        read = 0
        while read < _CHECK_WHOLE_FILE_BYTES and (chunk := f.read(_CHUNK)):
            read += len(chunk)
            yield chunk


def _decode(decoder, chunk: bytes, path: str, offset: int, final: bool = False) -> str:
    try:
        return decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
        byte = e.object[e.start] if e.start < len(e.object) else None
        what = f"byte 0x{byte:02x}" if byte is not None else "an incomplete character"
        raise ValueError(
            f"data file {path!r} is not UTF-8 text ({what} near offset {offset + e.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {'.utf8'.join(os.path.splitext(path))}"
        ) from None


def _check_text_file(path: str) -> None:
    """Refuse, naming the file, a text/JSON data file that is empty, binary or not UTF-8 (datasets' own error
    is a long traceback that never says which file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    try:
        for chunk in _chunks(path):
            if (nul := chunk.find(b"\0")) >= 0:
                raise ValueError(f"data file {path!r} is binary, not text (a NUL byte at offset {offset + nul}); "
                                 "pass a UTF-8 .txt/.json/.jsonl file or a .parquet file")
            has_text = bool(_decode(decoder, chunk, path, offset).strip()) or has_text
            offset += len(chunk)
        if offset < _CHECK_WHOLE_FILE_BYTES:
            _decode(decoder, b"", path, offset, final=True)  # a sequence cut at the end of the file
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"data file {path!r} cannot be read or decompressed: {e}") from e
    if offset and not has_text and offset < _CHECK_WHOLE_FILE_BYTES:
        raise ValueError(f"data file {path!r} holds no text (only whitespace); pass a file with documents")


def _check_data_file(path: str, builder: str) -> None:
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path!r} is empty; pass a file with documents")
    if builder != "parquet":
        _check_text_file(path)
        return
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-min(4, os.path.getsize(path)), os.SEEK_END)  # a file of 1-3 bytes has no room for the markers
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise ValueError(f"data file {path!r} is not a complete parquet file (no PAR1 marker at its "
                         f"{'start' if head != b'PAR1' else 'end'}: truncated or another format)")


def _root_cause(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _load_local(source: str, cache_dir: str | None) -> datasets.Dataset:
    files = _resolve_files(source)
    builders = {f: _builder_for(f) for f in files}
    kinds = sorted(set(builders.values()))
    if len(kinds) > 1:
        raise ValueError(
            f"{source!r} matches files of different kinds ({', '.join(kinds)}); use one kind per source"
        )
    builder = kinds[0]
    # Paragraph samples for text files, so that joining documents with "\n\n" rebuilds the file
    # (runs of blank lines collapse to one).
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    for f in files:
        _check_data_file(f, builder)
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # malformed JSON, a bad parquet footer, ...: one line naming the files
        cause = _root_cause(e)
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        named = repr(files[0]) if len(files) == 1 else f"{source!r} ({len(files)} files)"
        raise ValueError(f"cannot read data file {named}: {why}") from e


def load_text(
    source: str,
    *,
    split: str = "train",
    text_field: str | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """Load documents as a list of strings.

    Args:
        source: a local .txt / .json / .jsonl / .parquet file (optionally .gz etc.), a glob of them, or a
            known hub dataset name (see HUB_DATASETS: "wikitext2", "c4").
        split: the split of a hub dataset; a local file is its own split, so it is ignored there.
        text_field: the column holding the text; defaults to "text" (or the hub dataset's own field).
            Text files are read in paragraphs (blocks separated by blank lines; empty ones dropped).
        cache_dir: where datasets keeps its Arrow cache (its default if None).
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a non-empty str (a path, a glob or a hub name), got {source!r}")
    if source.lower() in HUB_DATASETS:
        ds, default_field = _load_hub(source.lower(), split)
    else:
        ds, default_field = _load_local(source, cache_dir), "text"
    column = text_field or default_field
    if column not in ds.column_names:
        raise ValueError(
            f"{source!r} has no column {column!r}; its columns are {ds.column_names}. "
            "Pass text_field=<one of them> (data.text_field in the recipe)."
        )
    texts = [t for t in ds[column] if t is not None]
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"data source {source!r} holds no text (column {column!r} has no non-empty document)")
    return texts


def tokenize_concat(texts: Sequence[str], tokenizer: Any, *, chunk_chars: int = 32_000_000) -> torch.Tensor:
    """Join documents with "\\n\\n" and tokenize the result once; returns a 1-D LongTensor.

    Like the GPTQ WikiText-2 recipe, special tokens (e.g. BOS) are added once, at the very start.
    Text longer than `chunk_chars` characters is tokenized in pieces split at document boundaries
    (each piece after the first begins with the "\\n\\n" separator) to bound peak memory; WikiText-2
    train (~11 M characters) stays in one piece.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of documents, not a single str; wrap it in a list")
    if len(texts) == 0:
        raise ValueError("no documents to tokenize (texts is empty)")
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be > 0, got {chunk_chars}")

    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for doc in texts:
        if current and size + len(doc) > chunk_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(doc)
        size += len(doc) + 2
    pieces.append("\n\n".join(current))

    ids: list[int] = []
    for i, piece in enumerate(pieces):
        text = piece if i == 0 else "\n\n" + piece
        enc = tokenizer(text, add_special_tokens=(i == 0), return_attention_mask=False, verbose=False)
        ids.extend(enc["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def _as_token_vector(tokens: torch.Tensor) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(
            f"expected a 1-D integer tensor of token ids, got {tokens.dtype} of shape {tuple(tokens.shape)}"
        )
    return tokens.long()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def calibration_blocks(tokens_1d: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets: LongTensor[nsamples, seqlen].

    Windows may overlap (as in GPTQ's get_wikitext2), but the text must hold at least
    nsamples * seqlen tokens, so that the request could be met without repeating text.
    """
    tokens = _as_token_vector(tokens_1d)
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    have, need = tokens.numel(), nsamples * seqlen
    if have < need:
        options = []
        if have >= seqlen:
            options.append(f"nsamples <= {have // seqlen} at seqlen {seqlen}")
        if have >= nsamples:
            options.append(f"seqlen <= {have // nsamples} with {nsamples} samples")
        options.append(f"at least {need} tokens of text")
        raise ValueError(
            f"calibration data too short: it has {have} tokens, but nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {need} tokens are needed. Use {' or '.join(options)}."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, have - seqlen + 1, (nsamples,), generator=gen)
    return tokens.cpu()[starts[:, None] + torch.arange(seqlen)]


def eval_windows(tokens_1d: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Consecutive non-overlapping windows: LongTensor[len // seqlen, seqlen]; the remainder is dropped."""
    tokens = _as_token_vector(tokens_1d)
    _check_positive(seqlen=seqlen)
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise ValueError(
            f"evaluation data too short: it has {tokens.numel()} tokens, fewer than one window of "
            f"seqlen {seqlen}; use seqlen <= {tokens.numel()} or more text"
        )
    return tokens[: n_windows * seqlen].reshape(n_windows, seqlen)


def check_token_ids(ids: torch.Tensor | None, vocab: int, *, what: str, model: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that does not belong to the model): on CPU
    they fail deep in the forward pass, on a GPU as an opaque device-side assert."""
    if ids is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = high if high >= vocab else low
        raise ValueError(f"{what}: token id {bad} is outside the vocabulary of {model} ({vocab} embeddings): the "
                         "tokenizer in the model folder does not belong to these weights")


class TokenBlockDataset(Dataset):
    """Rows of a [n, seqlen] token tensor as {"input_ids", "labels"} examples for the HF Trainer.

    Labels equal the inputs: causal-LM models shift them internally.
    """

    def __init__(self, blocks: torch.Tensor) -> None:
        blocks = torch.as_tensor(blocks)
        if blocks.ndim != 2 or blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
            raise ValueError(
                f"blocks must be a 2-D integer tensor [n, seqlen], got {blocks.dtype} {tuple(blocks.shape)}"
            )
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]
        # A separate labels tensor: a collator that masks labels in place must not touch the inputs.
        return {"input_ids": row, "labels": row.clone()}
