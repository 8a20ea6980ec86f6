"""Tokens out: the data front door. Token streams of a split, the tf.data pipeline of windows, story tokens
for scoring, and `python -m tfgpt.data`.

Stories come from `tfgpt.stories` (sources and the train / dev / validation splits); the token stream of a
split, `eos s1 eos s2 eos ...`, is built once and memory-mapped by `tfgpt.token_cache`. Both modules' public
names (`load_stories`, `DataError`, `token_stream`, ...) are re-exported here.

`make_dataset` cuts the stream into windows of context+1 tokens at offsets k·context and yields
(inputs, targets) = (window[:-1], window[1:]) batches; the window order of epoch e is a pure function of
(seed, e).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfgpt.common import BUNDLED_DATA, HF_SOURCE
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
from tfgpt.token_cache import cache_key, stream_dtype, token_stream  # noqa: F401  (re-exported)
from tfgpt.tokenizer import Tokenizer


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
            _, info = token_stream(args.data, tok, split, cache_dir=args.cache_dir, val_fraction=args.val_fraction,
                                   workers=args.workers, with_info=True)
            print(f"{info['split']}: {info['stories']:,} stories, {info['bytes']:,} bytes, {info['tokens']:,} tokens "
                  f"({info['bytes'] / max(1, info['tokens'] - info['stories'] - 1):.2f} bytes/token) -> {info['path']}")
    except (DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
