"""Stories in, token windows out: story sources, the on-disk token cache, and the tf.data pipeline.

A *source* is one string (`--data SOURCE`), resolved like this:

1. an existing local path:
   * a text file `.txt`, `.txt.xz`, `.txt.gz` in either TinyStories layout: stories separated by lines
     reading `<|endoftext|>` (the raw `TinyStories-train.txt` layout; text after the last separator is a
     cut-off story and is dropped), or stories separated by blank lines;
   * a `.jsonl` (`.jsonl.gz`, `.jsonl.xz`) or `.parquet` file with a `text` column;
   * a directory written by `datasets.save_to_disk` (a Dataset or a DatasetDict);
   * a directory holding any of the files above (searched recursively). Files whose name contains
     "valid" (or is an HF `val`/`validation` shard) are the validation split, all others the train split;
2. anything else is a Hugging Face dataset id (default `roneneldan/TinyStories`), read with
   `datasets.load_dataset` (optionally streaming).

A story is one document: its text with surrounding whitespace stripped (inner whitespace and newlines are
kept as they are). Held-out split: the source's own validation split where it has one; otherwise stories go
to validation when `hash(story) < val_fraction` (blake2b), so the same story always lands on the same side.

Dev split (for choices made without touching the test set): with `dev_fraction` > 0 the train stories are
split once more by a second, independent hash: `dev` = train stories with `hash_dev(story) < dev_fraction`,
`train` = the rest. The validation split is then the untouched test set.

The token stream of a split is `eos s1 eos s2 eos ...` (uint16; uint32 when the vocabulary exceeds
65535), built once per (source identity, tokenizer hash, split, split rule) into `cache_dir` and then
memory-mapped, so a second run starts instantly and a 2 GB corpus never sits in RAM.

`make_dataset` cuts the stream into windows of context+1 tokens at offsets k·context and yields
(inputs, targets) = (window[:-1], window[1:]) batches; the window order of epoch e is a pure function of
(seed, e).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import io
import itertools
import json
import lzma
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfgpt.common import BUNDLED_DATA, EOT, HF_SOURCE, atomic_write, make_readable
from tfgpt.tokenizer import Tokenizer

DEFAULT_SOURCE = HF_SOURCE
SPLITS = ("train", "dev", "validation", "all")
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "validation", "valid": "validation", "val": "validation",
                  "all": "all"}
_VALID_SPLIT_KEYS = ("validation", "valid", "val")
TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
#: Bumped whenever parsing or the stream layout changes, so old caches are not reused.
CACHE_FORMAT = 1
_SNIFF_BYTES = 4 << 20  # how much of a text file is read to tell the two layouts apart


class DataError(ValueError):
    """A data source or pipeline setting is unusable; the message says which and how to fix it."""


# =============================================================================================== sources
@dataclass
class _Resolved:
    """A source resolved for one split: how to iterate its stories and how to identify it for caching."""

    split: str
    description: str
    identity: dict[str, Any]
    iter_raw: Callable[[], Iterator[str]]  # stories of the chosen part (before the hash filter)
    hash_side: str | None = None  # "train"/"validation": keep only that side of the hash split
    val_fraction: float = 0.0
    dev_side: str | None = None  # "train"/"dev": keep only that side of the dev split of the train stories
    dev_fraction: float = 0.0


def load_stories(
    source: str = DEFAULT_SOURCE,
    split: str = "train",
    *,
    val_fraction: float = 0.05,
    dev_fraction: float = 0.0,
    streaming: bool = False,
) -> Iterator[str]:
    """Iterate over the stories of `split` ("train", "dev", "validation" or "all") of `source`.

    See the module docstring for the source forms and the split rules ("dev" needs dev_fraction > 0,
    which also removes the dev stories from "train"). Raises DataError (missing path, no stories,
    undecodable bytes with file and byte offset, unknown split, unreachable dataset).
    """
    resolved = _resolve(source, split, val_fraction=val_fraction, dev_fraction=dev_fraction, streaming=streaming)
    return _iter_resolved(resolved)


def _iter_resolved(resolved: _Resolved) -> Iterator[str]:
    count = 0
    for story in resolved.iter_raw():
        story = story.strip()
        if not story:
            continue
        if resolved.hash_side is not None and (
            (story_hash_fraction(story) < resolved.val_fraction) != (resolved.hash_side == "validation")
        ):
            continue
        if resolved.dev_side is not None and (
            (story_hash_fraction(story, "dev") < resolved.dev_fraction) != (resolved.dev_side == "dev")
        ):
            continue
        count += 1
        yield story
    if count == 0:
        raise DataError(f"no stories found in the {resolved.split} split of {resolved.description}; "
                        "check the path/file contents (and --val-fraction for a source without a validation split)")


def story_hash_fraction(story: str, salt: str = "") -> float:
    """A stable number in [0, 1) from the story text (blake2b); < val_fraction means validation. A `salt`
    ("dev" for the dev split) gives an independent number for a second split."""
    digest = hashlib.blake2b(story.encode("utf-8"), digest_size=8, salt=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _normalise_split(split: str) -> str:
    key = _SPLIT_ALIASES.get(str(split).lower())
    if key is None:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return key


def _check_fraction(val_fraction: float) -> float:
    if not isinstance(val_fraction, int | float) or not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def _looks_like_path(source: str) -> bool:
    """True for strings that cannot be a Hugging Face id (`name` or `owner/name`)."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return source.lower().endswith(ALL_SUFFIXES + (".xz", ".gz", ".json", ".arrow"))


def _resolve(source: str, split: str, *, val_fraction: float, dev_fraction: float = 0.0,
             streaming: bool) -> _Resolved:
    split = _normalise_split(split)
    if dev_fraction and not 0.0 < float(dev_fraction) < 1.0:
        raise DataError(f"dev_fraction must be in [0, 1), got {dev_fraction!r}")
    if split == "dev" and not dev_fraction:
        raise DataError("the dev split needs a dev fraction > 0 (e.g. --dev-fraction 0.05)")
    if split in ("train", "dev") and dev_fraction:
        resolved = _resolve_source(source, "train", val_fraction=val_fraction, streaming=streaming)
        resolved.split, resolved.dev_side, resolved.dev_fraction = split, split, float(dev_fraction)
        resolved.identity = {**resolved.identity, "dev_fraction": float(dev_fraction), "dev_side": split}
        return resolved
    return _resolve_source(source, split, val_fraction=val_fraction, streaming=streaming)


def _resolve_source(source: str, split: str, *, val_fraction: float, streaming: bool) -> _Resolved:
    if not isinstance(source, str | os.PathLike) or not str(source):
        raise DataError(f"data source must be a non-empty path or dataset id, got {source!r}")
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return _resolve_saved(path, split, val_fraction)
            return _resolve_files(path, _find_files(path), split, val_fraction, is_dir=True)
        return _resolve_files(path, [path], split, val_fraction, is_dir=False)
    if _looks_like_path(source):
        raise DataError(f"data path {source} does not exist; pass an existing file/directory or a "
                        f"Hugging Face dataset id such as {DEFAULT_SOURCE}")
    return _resolve_hub(source, split, val_fraction, streaming)


def has_validation_split(source: str) -> bool:
    """Whether `source` has a validation split of its own (a file with "valid" in its name, a saved
    dataset's validation split). False means that its "validation" split is the hash-split side of its
    stories (`val_fraction` of them). A Hugging Face id counts as having one (checked when it is read)."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        return not _looks_like_path(os.fspath(source))
    if path.is_file():
        return False
    if (path / "dataset_dict.json").is_file():
        keys = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return any(k in keys for k in _VALID_SPLIT_KEYS)
    if (path / "state.json").is_file():
        return False
    return any(_is_validation_file(p) for p in _find_files(path))


# ------------------------------------------------------------------------------------- local files
def _find_files(directory: Path) -> list[Path]:
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and p.name.lower().endswith(ALL_SUFFIXES)
    )
    if not files:
        raise DataError(f"no story files in {directory}; expected {', '.join(ALL_SUFFIXES)} files "
                        "or a directory written by datasets.save_to_disk")
    return files


def _is_validation_file(path: Path) -> bool:
    name = path.name.lower()
    return "valid" in name or re.match(r"^(val|dev)([-_.]|$)", name) is not None


def _file_identity(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _resolve_files(root: Path, files: list[Path], split: str, val_fraction: float, *, is_dir: bool) -> _Resolved:
    if not is_dir and not root.name.lower().endswith(ALL_SUFFIXES):
        raise DataError(f"{root}: unsupported file type; use one of {', '.join(ALL_SUFFIXES)} "
                        "or a directory of them")
    valid = [p for p in files if _is_validation_file(p)] if is_dir else []
    train = [p for p in files if p not in valid]
    if valid and split != "all":
        chosen = valid if split == "validation" else train
        if not chosen:
            raise DataError(f"{root} has no {split} files (files with 'valid' in the name are the "
                            "validation split, all others the train split)")
        rule: dict[str, Any] = {"rule": "files"}
        hash_side = None
    else:
        chosen = files
        hash_side = None if split == "all" else split
        rule = {"rule": "all"} if split == "all" else {"rule": "hash", "val_fraction": _check_fraction(val_fraction)}
    return _Resolved(
        split=split,
        description=str(root),
        identity={"kind": "files", "files": _file_identity(chosen), **rule},
        iter_raw=lambda: itertools.chain.from_iterable(_iter_file(p) for p in chosen),
        hash_side=hash_side,
        val_fraction=val_fraction if hash_side else 0.0,
    )


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _iter_file(path: Path) -> Iterator[str]:
    name = path.name.lower()
    try:
        if name.endswith(PARQUET_SUFFIXES):
            yield from _iter_parquet(path)
        elif name.endswith(JSONL_SUFFIXES):
            yield from _iter_jsonl(path)
        else:
            yield from _iter_text(path)
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated compressed file ({exc}); re-download or recompress it") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line with "\\n") of a possibly compressed UTF-8 file; CRLF becomes LF."""
    compressed = path.name.lower().endswith((".xz", ".gz"))
    offset = 0
    with _open_binary(path) as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = "of the decompressed text" if compressed else ""
                raise DataError(
                    f"{path}: invalid UTF-8 at byte offset {offset + exc.start} {where}".rstrip()
                    + "; convert the file to UTF-8"
                ) from None
            if offset == 0 and line.startswith("\ufeff"):
                line = line[1:]
            if line.endswith("\r\n"):
                line = line[:-2] + "\n"
            yield offset, line
            offset += len(raw)


def _iter_text(path: Path) -> Iterator[str]:
    """Stories of a text file, `<|endoftext|>` layout or blank-line layout (sniffed from the start)."""
    with _open_binary(path) as f:
        head = f.read(_SNIFF_BYTES)
    if not head.strip():
        raise DataError(f"{path} is empty; expected stories separated by {EOT} lines or blank lines")
    if EOT.encode() in head:
        yield from _iter_eot_layout(path)
    else:
        yield from _iter_blank_layout(path)


def _iter_eot_layout(path: Path) -> Iterator[str]:
    parts: list[str] = []
    for _, line in _iter_lines(path):
        if EOT in line:
            pieces = line.split(EOT)
            for piece in pieces[:-1]:
                parts.append(piece)
                yield "".join(parts)
                parts = []
            parts.append(pieces[-1])
        else:
            parts.append(line)
    # Whatever follows the last separator is a cut-off story: dropped.


def _iter_blank_layout(path: Path) -> Iterator[str]:
    parts: list[str] = []
    for _, line in _iter_lines(path):
        if line.strip():
            parts.append(line)
        elif parts:
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)


def _iter_jsonl(path: Path) -> Iterator[str]:
    for lineno, (_, line) in enumerate(_iter_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        yield record["text"]


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


# ------------------------------------------------------------------------------- datasets / the Hub
def _pick_splits(keys: list[str], split: str, source: str) -> tuple[str, str | None]:
    """(name of the split to read, hash side or None)."""
    valid_key = next((k for k in _VALID_SPLIT_KEYS if k in keys), None)
    train_key = "train" if "train" in keys else (keys[0] if len(keys) == 1 else None)
    if train_key is None:
        raise DataError(f"{source} has splits {keys}; expected a 'train' split")
    if split == "all":
        return train_key, None
    if valid_key is not None:
        return (valid_key if split == "validation" else train_key), None
    return train_key, split


def _dataset_stories(ds: Any, description: str) -> Iterator[str]:
    names = list(getattr(ds, "column_names", None) or [])
    if names and "text" not in names:
        raise DataError(f"{description} has no 'text' column (columns: {', '.join(names)})")
    if hasattr(ds, "iter") and hasattr(ds, "__len__"):  # map-style Dataset: read in Arrow batches
        for batch in ds.select_columns(["text"]).iter(batch_size=4096):
            yield from (t for t in batch["text"] if t is not None)
    else:
        for row in ds:
            text = row.get("text")
            if text is not None:
                yield text


def _resolve_saved(path: Path, split: str, val_fraction: float) -> _Resolved:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset ({exc})") from None
    keys = list(obj.keys()) if isinstance(obj, datasets.DatasetDict) else ["train"]
    key, hash_side = _pick_splits(keys, split, str(path))
    ds = obj[key] if isinstance(obj, datasets.DatasetDict) else obj
    if split == "all" and isinstance(obj, datasets.DatasetDict):
        parts = [obj[k] for k in keys]
        ds_iter: Callable[[], Iterator[str]] = lambda: itertools.chain.from_iterable(  # noqa: E731
            _dataset_stories(d, str(path)) for d in parts)
    else:
        ds_iter = lambda: _dataset_stories(ds, f"{path} [{key}]")  # noqa: E731
    files = sorted(p for p in path.rglob("*") if p.is_file())
    rule = {"rule": "hash", "val_fraction": _check_fraction(val_fraction)} if hash_side else {"rule": key}
    return _Resolved(
        split=split, description=str(path),
        identity={"kind": "saved", "files": _file_identity(files), "split_key": key, **rule},
        iter_raw=ds_iter, hash_side=hash_side, val_fraction=val_fraction if hash_side else 0.0,
    )


def _resolve_hub(source: str, split: str, val_fraction: float, streaming: bool) -> _Resolved:
    """A Hub dataset, opened lazily: the cache key (id, split, val_fraction) needs no network, so a
    cached token stream is used offline. Which split rule applies is known once the dataset is open."""
    val_fraction = _check_fraction(val_fraction)

    def stories() -> Iterator[str]:
        try:
            import datasets

            obj = datasets.load_dataset(source, streaming=streaming)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"{source!r} is not a local path and could not be loaded as a Hugging Face dataset "
                f"({type(exc).__name__}: {message[:200]}); check the id and your network, or use the "
                f"TinyStories sample that ships with tfgpt: --data {BUNDLED_DATA}"
            ) from None
        keys = list(obj.keys())
        key, hash_side = _pick_splits(keys, split, source)
        for part in [obj[k] for k in keys] if split == "all" else [obj[key]]:
            for story in _dataset_stories(part, f"{source} [{key}]"):
                if hash_side is None or (
                    (story_hash_fraction(story.strip()) < val_fraction) == (hash_side == "validation")
                ):
                    yield story

    return _Resolved(
        split=split, description=f"Hugging Face dataset {source}",
        identity={"kind": "hub", "id": source, "split": split, "val_fraction": val_fraction},
        iter_raw=stories,
    )


# =========================================================================================== token cache
def _stream_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tokenizer.vocab_size <= 65536 else np.dtype(np.uint32)


def cache_key(resolved_identity: dict[str, Any], tokenizer: Tokenizer, split: str) -> str:
    """Hash of everything the token stream depends on: source identity, tokenizer model, split rule."""
    blob = json.dumps(
        {"format": CACHE_FORMAT, "source": resolved_identity, "tokenizer": tokenizer.sha256, "split": split},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cache_paths(source: str, tokenizer: Tokenizer, split: str, cache_dir: str | Path,
                 val_fraction: float, dev_fraction: float = 0.0) -> tuple[_Resolved, Path, Path]:
    resolved = _resolve(source, split, val_fraction=val_fraction, dev_fraction=dev_fraction, streaming=True)
    key = cache_key(resolved.identity, tokenizer, resolved.split)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/\\")).name or source)[:40]
    base = Path(cache_dir) / f"{stem}.{resolved.split}.{key}"
    return resolved, base.with_suffix(base.suffix + ".bin"), base.with_suffix(base.suffix + ".json")


def token_stream(
    source: str,
    tokenizer: Tokenizer,
    split: str = "train",
    *,
    cache_dir: str | Path = ".cache/tokens",
    val_fraction: float = 0.05,
    dev_fraction: float = 0.0,
    workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """The token stream `eos s1 eos s2 eos ...` of one split, as a read-only 1-D memmap.

    Built once and cached under `cache_dir`: stories are streamed (a Hub dataset in streaming mode, so
    no second copy of it lands on disk), tokenised in 1 MB chunks by a pool of `workers` processes
    (in-process for a single chunk or workers=1), appended to a temporary file, and renamed into place
    with a JSON index beside it. The key covers the source identity (paths + sizes + mtimes, or the
    dataset id + split + val_fraction), the tokenizer's hash, the split and the split rule; later calls
    only map the file. dtype uint16 (uint32 when the vocabulary exceeds 65536 ids).
    """
    return _ensure_cache(source, tokenizer, split, cache_dir=cache_dir, val_fraction=val_fraction,
                         dev_fraction=dev_fraction, workers=workers, progress=progress)[0]


def token_stream_info(
    source: str,
    tokenizer: Tokenizer,
    split: str = "train",
    *,
    cache_dir: str | Path = ".cache/tokens",
    val_fraction: float = 0.05,
    dev_fraction: float = 0.0,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """The cache index of a token stream (built if needed): tokens, stories, bytes (UTF-8 bytes of the
    story texts, for bits per byte), dtype, key, path, source identity."""
    return _ensure_cache(source, tokenizer, split, cache_dir=cache_dir, val_fraction=val_fraction,
                         dev_fraction=dev_fraction, workers=workers, progress=progress)[1]


def _ensure_cache(source: str, tokenizer: Tokenizer, split: str, *, cache_dir: str | Path, val_fraction: float,
                  workers: int, progress: bool, dev_fraction: float = 0.0) -> tuple[np.ndarray, dict[str, Any]]:
    resolved, bin_path, index_path = _cache_paths(source, tokenizer, split, cache_dir, val_fraction, dev_fraction)
    dtype = _stream_dtype(tokenizer)
    if index_path.is_file() and bin_path.is_file():
        index = json.loads(index_path.read_text())
        if bin_path.stat().st_size == index["tokens"] * dtype.itemsize:
            return np.memmap(bin_path, dtype=dtype, mode="r"), index
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stats = _write_stream(_iter_resolved(resolved), tokenizer, bin_path, dtype, workers=workers,
                          progress=progress, desc=f"tokenising {resolved.split}")
    index = {
        "format": CACHE_FORMAT,
        "key": bin_path.stem.rsplit(".", 1)[-1],
        "source": source,
        "split": resolved.split,
        "source_identity": resolved.identity,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "tokens": stats["tokens"],
        "stories": stats["stories"],
        "bytes": stats["bytes"],
        "seconds": round(time.time() - start, 2),
        "path": str(bin_path),
    }
    atomic_write(index_path, (json.dumps(index, indent=2) + "\n").encode())
    return np.memmap(bin_path, dtype=dtype, mode="r"), index


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_proto)


def _encode_chunk_in_worker(stories: list[str]) -> tuple[bytes, int, int, int]:
    assert _WORKER_TOKENIZER is not None
    return _encode_chunk(_WORKER_TOKENIZER, stories)


def _encode_chunk(tokenizer: Tokenizer, stories: list[str]) -> tuple[bytes, int, int, int]:
    """(token bytes of `s1 eos s2 eos ...`, stories, tokens, UTF-8 bytes) of a chunk of stories."""
    flat: list[int] = []
    eos = tokenizer.eos_id
    for ids in tokenizer.encode_batch(stories):
        flat.extend(ids)
        flat.append(eos)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    n_bytes = sum(len(s.encode("utf-8")) for s in stories)
    return np.asarray(flat, dtype=dtype).tobytes(), len(stories), len(flat), n_bytes


def _chunks(stories: Iterable[str], max_chars: int = 1 << 20) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for story in stories:
        chunk.append(story)
        size += len(story)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_stream(stories: Iterator[str], tokenizer: Tokenizer, bin_path: Path, dtype: np.dtype, *,
                  workers: int, progress: bool, desc: str) -> dict[str, int]:
    """Tokenise `stories` into `bin_path` (via a temporary file); at most 2·workers chunks in flight."""
    from tqdm.auto import tqdm

    fd, tmp = tempfile.mkstemp(prefix=f".{bin_path.name}.", suffix=".tmp", dir=bin_path.parent)
    stats = {"tokens": 1, "stories": 0, "bytes": 0}
    pool = None
    try:
        with os.fdopen(fd, "wb") as out, tqdm(desc=desc, unit=" stories", disable=not progress,
                                              mininterval=0.5, dynamic_ncols=True) as bar:

            def write(result: tuple[bytes, int, int, int]) -> None:
                data, n_stories, n_tokens, n_bytes = result
                out.write(data)
                stats["stories"] += n_stories
                stats["tokens"] += n_tokens
                stats["bytes"] += n_bytes
                bar.update(n_stories)
                bar.set_postfix(tokens=f"{stats['tokens']:.3g}", MB=f"{stats['bytes'] / 1e6:.0f}", refresh=False)

            out.write(np.asarray([tokenizer.eos_id], dtype=dtype).tobytes())
            chunks = _chunks(stories)
            head = list(itertools.islice(chunks, 2))
            chunks = itertools.chain(head, chunks)
            if workers > 1 and len(head) > 1:  # a pool only pays off beyond one chunk (1 MB of text)
                ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_proto,))
                pending: collections.deque = collections.deque()
                for chunk in chunks:  # bounded read-ahead: memory stays flat on a 2 GB corpus
                    pending.append(pool.apply_async(_encode_chunk_in_worker, (chunk,)))
                    if len(pending) >= 2 * workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
            else:
                for chunk in chunks:
                    write(_encode_chunk(tokenizer, chunk))
        make_readable(tmp)
        os.replace(tmp, bin_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return stats


# ========================================================================================== tf.data windows
def num_windows(tokens: np.ndarray, context: int) -> int:
    """Windows of context+1 tokens at offsets k·context that fit in the stream."""
    return max(0, (len(tokens) - 1) // int(context))


def steps_per_epoch(tokens: np.ndarray, context: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Batches in one pass over the training windows."""
    n = num_windows(tokens, context)
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def epoch_order(n_windows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Window indices of epoch `epoch` in order: a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n_windows, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_windows).astype(np.int64)


def _check_pipeline_args(tokens: Any, context: int, batch_size: int, first_epoch: int, skip_batches: int) -> None:
    for name, value in (("context", context), ("batch_size", batch_size)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("first_epoch", first_epoch), ("skip_batches", skip_batches)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
            raise DataError(f"{name} must be a non-negative integer, got {value!r}")
    if getattr(tokens, "ndim", None) != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError("tokens must be a 1-D integer array (the output of token_stream)")


def make_dataset(
    tokens: np.ndarray,
    context: int,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    first_epoch: int = 0,
    skip_batches: int = 0,
    repeat: bool = False,
    drop_remainder: bool = True,
):
    """Batches of (inputs, targets), int32 (B, context), from a token stream (memmap ok).

    Window k is tokens[k·context : k·context + context + 1]; inputs = window[:-1], targets = window[1:].
    Epoch e visits every window once, in the order `epoch_order(n, seed, e)` (identity when
    shuffle=False), grouped into consecutive batches; drop_remainder drops the last partial batch.
    Epochs start at `first_epoch`; repeat=True continues with e+1, e+2, ... forever. skip_batches drops
    the first batches of the first epoch (a value ≥ the epoch length moves on to later epochs), so a run
    resumed after N steps sees exactly the batches it would have seen. The array is read with a
    `tf.numpy_function` gather per batch and never embedded in the graph.
    """
    import tensorflow as tf

    _check_pipeline_args(tokens, context, batch_size, first_epoch, skip_batches)
    context, batch_size = int(context), int(batch_size)
    n = num_windows(tokens, context)
    if n == 0:
        raise DataError(f"token stream of {len(tokens)} tokens is too short for one window of "
                        f"context+1 = {context + 1} tokens; use more data or a smaller context")
    steps = steps_per_epoch(tokens, context, batch_size, drop_remainder=drop_remainder)
    if steps == 0:
        raise DataError(f"only {n} windows of {context + 1} tokens, fewer than batch_size {batch_size}; "
                        "use more data, a smaller batch or drop_remainder=False")
    first_epoch += skip_batches // steps
    skip_batches %= steps
    offsets = np.arange(context + 1, dtype=np.int64)

    def batch_indices(epoch: np.ndarray) -> np.ndarray:
        """Flat window indices of epoch `epoch` (after the skip), padded to whole batches with -1."""
        order = epoch_order(n, seed, int(epoch), shuffle)[: steps * batch_size]
        if int(epoch) == first_epoch and skip_batches:
            order = order[skip_batches * batch_size:]
        pad = (-len(order)) % batch_size
        if pad:
            order = np.concatenate([order, np.full(pad, -1, dtype=np.int64)])
        return order.reshape(-1, batch_size)

    def gather(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = idx[idx >= 0]
        windows = np.asarray(tokens[(idx * context)[:, None] + offsets], dtype=np.int32)
        return windows[:, :-1], windows[:, 1:]

    def epoch_batches(epoch):
        idx = tf.numpy_function(batch_indices, [epoch], tf.int64, stateful=False)
        return tf.data.Dataset.from_tensor_slices(tf.reshape(idx, (-1, batch_size)))

    def load(idx):
        x, y = tf.numpy_function(gather, [idx], (tf.int32, tf.int32), stateful=False)
        b = batch_size if drop_remainder else None
        x.set_shape((b, context))
        y.set_shape((b, context))
        return x, y

    last = np.iinfo(np.int64).max if repeat else first_epoch + 1
    ds = tf.data.Dataset.range(first_epoch, last)
    ds = ds.flat_map(epoch_batches)
    # flat_map hides the length; state it so Keras shows progress and never warns about running dry.
    n_batches = tf.data.INFINITE_CARDINALITY if repeat else steps - skip_batches
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# ========================================================================================= story tokens
@dataclass
class StoryTokens:
    """Whole stories as token sequences for scoring, each laid out as in the training stream:
    [eos, t₁, …, t_n, eos] (the model sees the story start after an end-of-text token and is judged on
    where it ends), with the UTF-8 byte count of the stories' text (for bits per byte)."""

    sequences: list[np.ndarray]
    bytes: int

    def __len__(self) -> int:
        return len(self.sequences)


def story_tokens(stories: Iterable[str], tokenizer: Tokenizer, *, max_stories: int | None = None) -> StoryTokens:
    """Tokenise `stories` (e.g. `load_stories(source, "validation")`) for `tfgpt.evaluation.evaluate_model`;
    only the first `max_stories` when given."""
    texts = list(itertools.islice(stories, max_stories)) if max_stories is not None else list(stories)
    eos = int(tokenizer.eos_id)
    dtype = np.int32
    sequences = [np.asarray([eos, *ids, eos], dtype) for ids in tokenizer.encode_batch(texts)] if texts else []
    return StoryTokens(sequences, sum(len(t.encode("utf-8")) for t in texts))


# ================================================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m tfgpt.data {tokenize,train-tokenizer} ...`: pre-tokenise a source (build its token caches and
    print counts), or train the SentencePiece tokenizer on its train split."""
    from tfgpt.tokenizer import MODEL_FILE, TokenizerError, train_tokenizer

    parser = argparse.ArgumentParser(prog="python -m tfgpt.data", description="Prepare a story source.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_tok = sub.add_parser("tokenize", help="build the token caches of a source and print their counts")
    p_tok.add_argument("--tokenizer", default="tokenizer", help="tokenizer directory or .model file")
    p_tok.add_argument("--splits", default="train,validation")
    p_tok.add_argument("--cache-dir", default=".cache/tokens")
    p_tok.add_argument("--workers", type=int, default=2)
    p_train = sub.add_parser("train-tokenizer", help="train a SentencePiece BPE tokenizer on a source's train split")
    p_train.add_argument("--vocab-size", type=int, default=4096)
    p_train.add_argument("--out", default="tokenizer", help="output directory")
    p_train.add_argument("--max-stories", type=int, default=500_000,
                         help="train on at most this many stories (uniform sample)")
    p_train.add_argument("--seed", type=int, default=0)
    for p in (p_tok, p_train):
        p.add_argument("--data", default=DEFAULT_SOURCE,
                       help=f"HF dataset id, directory, or text file (offline: {BUNDLED_DATA})")
        p.add_argument("--val-fraction", type=float, default=0.05,
                       help="held-out fraction when the source has no validation split")
    args = parser.parse_args(argv)
    try:
        if args.command == "train-tokenizer":
            stories = load_stories(args.data, "train", val_fraction=args.val_fraction)
            tok = train_tokenizer(stories, args.vocab_size, args.out, max_stories=args.max_stories,
                                  seed=args.seed, source=args.data)
            print(f"wrote {Path(args.out) / MODEL_FILE} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
            return 0
        tok = Tokenizer.load(args.tokenizer)
        for split in args.splits.split(","):
            info = token_stream_info(args.data, tok, split, cache_dir=args.cache_dir,
                                     val_fraction=args.val_fraction, workers=args.workers)
            print(f"{info['split']}: {info['stories']:,} stories, {info['bytes']:,} bytes, {info['tokens']:,} tokens "
                  f"({info['bytes'] / max(1, info['tokens'] - info['stories'] - 1):.2f} bytes/token) -> {info['path']}")
    except (DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
