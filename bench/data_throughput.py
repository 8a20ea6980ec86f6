"""Data throughput (issue 3): tokenisation MB/s, pipeline batches/s, and both projected to full TinyStories.

    .venv/bin/python bench/data_throughput.py                   # 200 MB synthetic corpus
    .venv/bin/python bench/data_throughput.py --size-mb 50      # smaller, for 2 busy cores

1. Builds a synthetic corpus of --size-mb MB in a temporary directory (deleted afterwards, never committed)
   by sampling sentences of the bundled TinyStories text (data/tinystories) into stories, in the raw `<|endoftext|>` layout.
2. Tokenises it with the committed tokenizer through `tfgpt.data.token_stream` (the real code path:
   parse, tokenise, write the uint16 cache), with 1 process and with a pool of 2; then times the cached
   second call. Also times parsing alone, plain SentencePiece and Tokenizer.encode_batch (word memo)
   on a 10 MB sample, to show where the time goes. Peak RSS shows the build streams (it does not grow with the corpus).
3. Times the `make_dataset` pipeline (context 256, batch 32, shuffled, repeating) over the token memmap,
   against two other ways to feed the same windows (tf.data.Dataset.from_generator and a
   tf.py_function gather), and over a 1 GB token memmap (sparse file) to show size does not matter;
   --rounds interleaved rounds, the best of each reported (fair on a busy machine).
4. Times a bench-6m training step (`model.fit`, batch 32, context 256) to get the tokens/s training
   consumes (or take --train-tokens-per-s), and checks the pipeline is >= 10x faster.
5. Projects tokenisation time, cache size and epoch times to the full 1.9 GB TinyStories train text.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tfgpt.data import (  # noqa: E402
    epoch_order,
    load_stories,
    make_dataset,
    num_windows,
    token_stream,
)
from tfgpt.tokenizer import Tokenizer  # noqa: E402

FULL_TINYSTORIES_BYTES = 1.92e9  # TinyStories-train.txt (V1), about 1.9 GB of UTF-8 text


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=200.0, help="synthetic corpus size")
    p.add_argument("--data", default=str(REPO / "data" / "tinystories"),
                   help="where the sentences are sampled from")
    p.add_argument("--tokenizer", default=str(REPO / "tokenizer"))
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pipeline-batches", type=int, default=2000, help="batches timed per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is reported)")
    p.add_argument("--train-steps", type=int, default=8, help="timed bench-6m steps (after 2 warm-up steps)")
    p.add_argument("--train-tokens-per-s", type=float, default=None,
                   help="skip the bench-6m measurement and use this training rate")
    p.add_argument("--tmp", default=None, help="directory for the temporary corpus (default: system temp)")
    return p.parse_args()


def build_corpus(path: Path, size_bytes: int, source: str, seed: int = 0) -> tuple[int, int]:
    """Stories of 4-16 sampled sentences (a newline between some), `<|endoftext|>` layout. (bytes, stories)"""
    sentences: list[str] = []
    for split in ("train", "validation"):
        for story in load_stories(source, split):
            sentences += [s for s in re.split(r"(?<=[.!?])\s+", story.replace("\n", " ")) if s]
    rng = np.random.default_rng(seed)
    written = stories = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            lengths = rng.integers(4, 17, size=2000)
            picks = rng.integers(0, len(sentences), size=int(lengths.sum()))
            breaks = rng.random(size=len(picks)) < 0.25
            parts, i = [], 0
            for n in lengths:
                words = [sentences[j] + ("\n" if b else " ") for j, b in zip(picks[i:i + n], breaks[i:i + n],
                                                                              strict=True)]
                i += n
                parts.append("".join(words).strip() + "\n<|endoftext|>\n")
            block = "".join(parts)
            f.write(block)
            written += len(block.encode("utf-8"))
            stories += len(lengths)
    return written, stories


def peak_rss_mb() -> tuple[float, float]:
    """(peak RSS of this process, of its largest finished child) in MB."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


def time_pipeline(ds, n_batches: int) -> float:
    """Batches per second over n_batches (after 50 warm-up batches)."""
    it = iter(ds)
    for _ in range(50):
        next(it)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches / (time.perf_counter() - start)


def generator_dataset(tokens: np.ndarray, context: int, batch: int, seed: int = 0):
    """The same batches via tf.data.Dataset.from_generator (a Python loop builds each batch)."""
    import tensorflow as tf

    n = num_windows(tokens, context)
    offsets = np.arange(context + 1)

    def gen():
        epoch = 0
        while True:
            order = epoch_order(n, seed, epoch)
            for b in range(n // batch):
                idx = order[b * batch:(b + 1) * batch]
                w = np.asarray(tokens[(idx * context)[:, None] + offsets], dtype=np.int32)
                yield w[:, :-1], w[:, 1:]
            epoch += 1

    spec = tf.TensorSpec((batch, context), tf.int32)
    return tf.data.Dataset.from_generator(gen, output_signature=(spec, spec)).prefetch(tf.data.AUTOTUNE)


def py_function_dataset(tokens: np.ndarray, context: int, batch: int, seed: int = 0):
    """The same batches via an index dataset + tf.py_function gather (eager tensors instead of NumPy)."""
    import tensorflow as tf

    n = num_windows(tokens, context)
    offsets = np.arange(context + 1)
    order = epoch_order(n, seed, 0)[: (n // batch) * batch].reshape(-1, batch)

    def gather(idx):
        idx = idx.numpy()
        w = np.asarray(tokens[(idx * context)[:, None] + offsets], dtype=np.int32)
        return w[:, :-1], w[:, 1:]

    ds = tf.data.Dataset.from_tensor_slices(order).repeat()
    ds = ds.map(lambda i: tf.py_function(gather, [i], (tf.int32, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def train_tokens_per_s(context: int, batch: int, steps: int) -> float:
    import keras

    from tfgpt import GPT, GPTConfig

    config = GPTConfig.from_preset("bench-6m", context=context)
    model = GPT(config)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    x = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch * (steps + 2), context), dtype=np.int32)
    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            float(logs["loss"])  # waits for the step
            times.append(time.perf_counter())

    model.fit(x, x, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=[Clock()])
    step = float(np.median(np.diff(times[1:])))  # drop the compile step
    return batch * context / step


def main() -> None:
    args = parse_args()
    tok = Tokenizer.load(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="tfgpt-data-bench-", dir=args.tmp))
    rows: list[tuple[str, str]] = []
    try:
        corpus = work / "synthetic-train.txt"
        t0 = time.perf_counter()
        n_bytes, n_stories = build_corpus(corpus, int(args.size_mb * 1e6), args.data)
        mb = n_bytes / 1e6
        print(f"built {mb:.0f} MB synthetic corpus ({n_stories:,} stories) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        src = str(corpus)

        t0 = time.perf_counter()
        n = sum(1 for _ in load_stories(src, "all"))
        parse_s = time.perf_counter() - t0
        rows.append(("parse only (read + split stories)", f"{mb / parse_s:.1f} MB/s ({n:,} stories)"))

        rss_before = peak_rss_mb()[0]
        results = {}
        for workers in (1, 2):
            cache = work / f"cache-{workers}"
            t0 = time.perf_counter()
            tokens = token_stream(src, tok, "all", cache_dir=cache, workers=workers)
            seconds = time.perf_counter() - t0
            results[workers] = (seconds, tokens)
            rows.append((f"token_stream build, workers={workers}", f"{mb / seconds:.1f} MB/s ({seconds:.0f} s)"))
        me, kids = peak_rss_mb()
        rows.append(("peak RSS: before building / after both builds / largest worker",
                     f"{rss_before:.0f} MB / {me:.0f} MB / {kids:.0f} MB"))
        assert np.array_equal(results[1][1], results[2][1])
        sample = []
        size = 0
        for story in load_stories(src, "all"):
            sample.append(story)
            size += len(story.encode())
            if size > 10e6:
                break
        cold = Tokenizer(tok.model_proto)  # an empty word memo
        t0 = time.perf_counter()
        reference = [tok.encode(s) for s in sample]
        rows.append((f"SentencePiece encode, one text at a time ({size / 1e6:.0f} MB)",
                     f"{size / 1e6 / (time.perf_counter() - t0):.1f} MB/s"))
        t0 = time.perf_counter()
        fast = cold.encode_batch(sample)
        rows.append((f"Tokenizer.encode_batch, word memo ({size / 1e6:.0f} MB)",
                     f"{size / 1e6 / (time.perf_counter() - t0):.1f} MB/s"))
        assert fast == reference
        del reference, fast

        t0 = time.perf_counter()
        tokens = token_stream(src, tok, "all", cache_dir=work / "cache-2")
        rows.append(("token_stream second call (cache hit)", f"{(time.perf_counter() - t0) * 1e3:.1f} ms"))
        info = token_stream(src, tok, "all", cache_dir=work / "cache-2", with_info=True)[1]
        bytes_per_token = info["bytes"] / info["tokens"]
        rows.append(("tokens / cache size", f"{info['tokens']:,} tokens, {tokens.nbytes / 1e6:.0f} MB uint16 "
                                            f"({bytes_per_token:.2f} text bytes per stream token)"))
        best_mb_s = mb / min(s for s, _ in results.values())

        c, b = args.context, args.batch
        per_batch = b * c
        big = work / "big.bin"
        big_tokens = np.memmap(big, dtype=np.uint16, mode="w+", shape=(500_000_000,))  # 1 GB, sparse
        big_tokens[:: 1 << 20] = 7
        big_tokens.flush()
        big_tokens = np.memmap(big, dtype=np.uint16, mode="r")
        t0 = time.perf_counter()
        big_ds = make_dataset(big_tokens, c, b, seed=0, repeat=True)
        first = next(iter(big_ds))
        big_first_s = time.perf_counter() - t0
        assert first[0].shape == (b, c)
        candidates = {
            "make_dataset (numpy_function gather)": lambda: make_dataset(tokens, c, b, seed=0, repeat=True),
            "from_generator": lambda: generator_dataset(tokens, c, b),
            "py_function gather": lambda: py_function_dataset(tokens, c, b),
            "make_dataset on a 1 GB memmap": lambda: make_dataset(big_tokens, c, b, seed=0, repeat=True),
        }
        pipe = {name: 0.0 for name in candidates}
        for _ in range(args.rounds):  # interleaved rounds, best of each: fair on a busy machine
            for name, build in candidates.items():
                pipe[name] = max(pipe[name], time_pipeline(build(), args.pipeline_batches))
        for name, bps in pipe.items():
            rows.append((f"pipeline: {name}", f"{bps:,.0f} batches/s = {bps * per_batch / 1e6:.2f} M tokens/s"))
        rows.append(("1 GB memmap: time to first batch (epoch permutation)", f"{big_first_s:.2f} s"))
        pipeline_tps = pipe["make_dataset (numpy_function gather)"] * per_batch

        if args.train_tokens_per_s:
            train_tps = args.train_tokens_per_s
            how = "(given by --train-tokens-per-s)"
        else:
            train_tps = train_tokens_per_s(c, b, args.train_steps)
            how = "(measured: bench-6m model.fit, XLA)"
        rows.append((f"training consumes {how}", f"{train_tps:,.0f} tokens/s = {train_tps / per_batch:.2f} steps/s"))
        ratio = pipeline_tps / train_tps
        rows.append(("pipeline / training speed", f"{ratio:,.0f}x ({'OK' if ratio >= 10 else 'FAIL'}: need >= 10x)"))

        full_tokens = FULL_TINYSTORIES_BYTES / bytes_per_token
        rows.append(("projected: full TinyStories (1.9 GB) tokenisation",
                     f"{FULL_TINYSTORIES_BYTES / 1e6 / best_mb_s / 60:.0f} min at {best_mb_s:.1f} MB/s (once; cached)"))
        rows.append(("projected: full TinyStories tokens / cache",
                     f"{full_tokens / 1e6:,.0f} M tokens, {full_tokens * 2 / 1e9:.2f} GB uint16"))
        rows.append(("projected: one epoch through the pipeline alone",
                     f"{full_tokens / pipeline_tps / 60:.1f} min"))
        rows.append(("projected: one epoch of bench-6m training at the measured rate",
                     f"{full_tokens / train_tps / 3600:.1f} h"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ncorpus: {mb:.0f} MB synthetic ({n_stories:,} stories sampled from {args.data}); "
          f"tokenizer {args.tokenizer} (vocab {tok.vocab_size}); context {args.context}, batch {args.batch}; "
          f"{os.cpu_count()} CPU cores\n")
    width = max(len(k) for k, _ in rows)
    print(f"| {'measurement'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
