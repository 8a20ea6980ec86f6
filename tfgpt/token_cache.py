"""The on-disk token cache of a split: its stories tokenised once into `eos s1 eos s2 eos ...`, then memory-mapped.

One cache file per (source identity, tokenizer hash, split, split rule) under `cache_dir` (a `.bin` of token
ids in `stream_dtype` and a `.json` index beside it), so a second run starts instantly and a 2 GB corpus never
sits in RAM. Stories come from `tfgpt.stories`; `tfgpt.data` re-exports `token_stream`.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from tfgpt.common import atomic_file, atomic_write
from tfgpt.stories import ResolvedSource, iter_source, resolve_source
from tfgpt.tokenizer import Tokenizer

#: Bumped whenever parsing or the stream layout changes, so old caches are not reused.
CACHE_FORMAT = 1


# =========================================================================================== token cache
def stream_dtype(tokenizer: Tokenizer) -> np.dtype:
    """uint16 while every id fits (vocabularies of up to 65,536 ids), else uint32."""
    return np.dtype(np.uint16) if tokenizer.vocab_size <= 65536 else np.dtype(np.uint32)


def cache_key(resolved_identity: dict[str, Any], tokenizer: Tokenizer, split: str) -> str:
    """Hash of everything the token stream depends on: source identity, tokenizer model, split rule."""
    blob = json.dumps(
        {"format": CACHE_FORMAT, "source": resolved_identity, "tokenizer": tokenizer.sha256, "split": split},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cache_paths(source: str, tokenizer: Tokenizer, split: str, cache_dir: str | Path,
                 val_fraction: float, dev_fraction: float = 0.0,
                 train_fraction: float = 1.0) -> tuple[ResolvedSource, Path, Path]:
    resolved = resolve_source(source, split, val_fraction=val_fraction, dev_fraction=dev_fraction,
                              train_fraction=train_fraction, streaming=True)
    key = cache_key(resolved.identity, tokenizer, resolved.split)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/\\")).name or source)[:40]
    base = Path(cache_dir) / f"{stem}.{resolved.split}.{key}"
    return resolved, base.with_suffix(base.suffix + ".bin"), base.with_suffix(base.suffix + ".json")


@overload
def token_stream(source: str, tokenizer: Tokenizer, split: str = ..., *, with_info: Literal[False] = ...,
                 **options: Any) -> np.ndarray: ...


@overload
def token_stream(source: str, tokenizer: Tokenizer, split: str = ..., *, with_info: Literal[True],
                 **options: Any) -> tuple[np.ndarray, dict[str, Any]]: ...


def token_stream(
    source: str,
    tokenizer: Tokenizer,
    split: str = "train",
    *,
    cache_dir: str | Path = ".cache/tokens",
    val_fraction: float = 0.05,
    dev_fraction: float = 0.0,
    train_fraction: float = 1.0,
    workers: int = 2,
    progress: bool = True,
    with_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """The token stream `eos s1 eos s2 eos ...` of one split, as a read-only 1-D memmap; with_info=True:
    (stream, its cache index: tokens, stories, bytes (UTF-8 bytes of the story texts, for bits per byte),
    dtype, key, path, source identity).

    Built once and cached under `cache_dir`: stories are streamed (a Hub dataset in streaming mode, so
    no second copy of it lands on disk), tokenised in 1 MB chunks by a pool of `workers` processes
    (in-process for a single chunk or workers=1), appended to a temporary file, and renamed into place
    with a JSON index beside it. The key covers the source identity (paths + sizes + mtimes, or the
    dataset id + split + val_fraction), the tokenizer's hash, the split and the split rule; later calls
    only map the file. dtype: `stream_dtype`.
    """
    tokens, index = _ensure_cache(source, tokenizer, split, cache_dir=cache_dir, val_fraction=val_fraction,
                                  dev_fraction=dev_fraction, train_fraction=train_fraction, workers=workers,
                                  progress=progress)
    return (tokens, index) if with_info else tokens


def _ensure_cache(source: str, tokenizer: Tokenizer, split: str, *, cache_dir: str | Path, val_fraction: float,
                  workers: int, progress: bool, dev_fraction: float = 0.0,
                  train_fraction: float = 1.0) -> tuple[np.ndarray, dict[str, Any]]:
    resolved, bin_path, index_path = _cache_paths(source, tokenizer, split, cache_dir, val_fraction, dev_fraction,
                                                  train_fraction)
    dtype = stream_dtype(tokenizer)
    if index_path.is_file() and bin_path.is_file():
        index = json.loads(index_path.read_text())
        if bin_path.stat().st_size == index["tokens"] * dtype.itemsize:
            return np.memmap(bin_path, dtype=dtype, mode="r"), index
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stats = _write_stream(iter_source(resolved), tokenizer, bin_path, dtype, workers=workers,
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
    dtype = stream_dtype(tokenizer)
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

    stats = {"tokens": 1, "stories": 0, "bytes": 0}
    pool = None
    try:
        with atomic_file(bin_path) as out, tqdm(desc=desc, unit=" stories", disable=not progress,
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
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return stats
