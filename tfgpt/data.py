"""Tokens out: the on-disk token cache of a split, the tf.data pipeline of windows, story tokens for scoring.

Stories come from `tfgpt.stories` (sources and the train / dev / validation splits; `load_stories` and
`DataError` are re-exported here).

The token stream of a split is `eos s1 eos s2 eos ...` (`_stream_dtype`: uint16 while every id fits), built once per (source identity, tokenizer hash, split, split rule) into `cache_dir` and then
memory-mapped, so a second run starts instantly and a 2 GB corpus never sits in RAM.

`make_dataset` cuts the stream into windows of context+1 tokens at offsets k·context and yields
(inputs, targets) = (window[:-1], window[1:]) batches; the window order of epoch e is a pure function of
(seed, e).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import math
import multiprocessing
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfgpt.common import BUNDLED_DATA, HF_SOURCE, atomic_file, atomic_write
from tfgpt.stories import (  # noqa: F401  (re-exported: the data front door)
    SPLITS,
    DataError,
    ResolvedSource,
    has_validation_split,
    iter_source,
    load_stories,
    resolve_source,
    story_hash_fraction,
)
from tfgpt.tokenizer import Tokenizer

#: Bumped whenever parsing or the stream layout changes, so old caches are not reused.
CACHE_FORMAT = 1


# =========================================================================================== token cache
def _stream_dtype(tokenizer: Tokenizer) -> np.dtype:
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
) -> np.ndarray:
    """The token stream `eos s1 eos s2 eos ...` of one split, as a read-only 1-D memmap.

    Built once and cached under `cache_dir`: stories are streamed (a Hub dataset in streaming mode, so
    no second copy of it lands on disk), tokenised in 1 MB chunks by a pool of `workers` processes
    (in-process for a single chunk or workers=1), appended to a temporary file, and renamed into place
    with a JSON index beside it. The key covers the source identity (paths + sizes + mtimes, or the
    dataset id + split + val_fraction), the tokenizer's hash, the split and the split rule; later calls
    only map the file. dtype: `_stream_dtype`.
    """
    return _ensure_cache(source, tokenizer, split, cache_dir=cache_dir, val_fraction=val_fraction,
                         dev_fraction=dev_fraction, train_fraction=train_fraction, workers=workers,
                         progress=progress)[0]


def token_stream_info(
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
) -> dict[str, Any]:
    """The cache index of a token stream (built if needed): tokens, stories, bytes (UTF-8 bytes of the
    story texts, for bits per byte), dtype, key, path, source identity."""
    return _ensure_cache(source, tokenizer, split, cache_dir=cache_dir, val_fraction=val_fraction,
                         dev_fraction=dev_fraction, train_fraction=train_fraction, workers=workers,
                         progress=progress)[1]


def _ensure_cache(source: str, tokenizer: Tokenizer, split: str, *, cache_dir: str | Path, val_fraction: float,
                  workers: int, progress: bool, dev_fraction: float = 0.0,
                  train_fraction: float = 1.0) -> tuple[np.ndarray, dict[str, Any]]:
    resolved, bin_path, index_path = _cache_paths(source, tokenizer, split, cache_dir, val_fraction, dev_fraction,
                                                  train_fraction)
    dtype = _stream_dtype(tokenizer)
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
    dtype = _stream_dtype(tokenizer)
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
    sequences = [np.asarray([eos, *ids, eos], np.int32) for ids in tokenizer.encode_batch(texts)] if texts else []
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
    p_train.add_argument("--dev-fraction", type=float, default=0.0,
                         help="leave out the dev split of the train stories (as train_keras.py --dev-fraction does)")
    for p in (p_tok, p_train):
        p.add_argument("--data", default=HF_SOURCE,
                       help=f"HF dataset id, directory, or text file (offline: {BUNDLED_DATA})")
        p.add_argument("--val-fraction", type=float, default=0.05,
                       help="held-out fraction when the source has no validation split")
    args = parser.parse_args(argv)
    try:
        if args.command == "train-tokenizer":
            stories = load_stories(args.data, "train", val_fraction=args.val_fraction, dev_fraction=args.dev_fraction)
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
