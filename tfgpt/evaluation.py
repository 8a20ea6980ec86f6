"""Held-out scores of a language model (loss, perplexity, bits per byte) and sample-quality measures.

Scoring. Each story is scored on its own, as it appears in the training stream: the input starts with
the end-of-text token and the targets are the story's tokens followed by the closing end-of-text token
(the model is also judged on where the story ends):

    x = [eos, t₁, …, t_n],  y = [t₁, …, t_n, eos],   NLL = −Σ_i log p(y_i | x_≤i)

Stories longer than the context T are scored with a sliding window (stride s ≤ T): the first window
scores its T targets; each later window moves by s and scores only its targets not scored before, each
seen with at least T − s tokens of left context (s = 1 is exact full-window context, s = T is
non-overlapping chunks).

    loss          = Σ NLL / tokens                 (mean next-token loss, nats)
    perplexity    = exp(loss)
    bits per byte = Σ NLL / ln 2 / bytes           (bytes = UTF-8 bytes of the stories' text)

Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies.

Sample quality (of N sampled stories, words = lower-cased `\\w+` runs and punctuation marks):
distinct-n = distinct word n-grams / all word n-grams over all samples (Li et al. 2016); repetition
rate = mean over samples of 1 − distinct 4-grams / 4-grams within the sample (seq-rep-4, Welleck et al.
2020); eos rate = share of samples that ended with the end-of-text token (rather than running into
max_new_tokens).
"""

from __future__ import annotations

import collections
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfgpt.common import round_up
from tfgpt.data import StoryTokens
from tfgpt.generation import completion_text, generate


class EvaluationError(ValueError):
    """An evaluation argument is invalid; the message says which and how to fix it."""


# ------------------------------------------------------------------------------- windows
def story_windows(ids: Sequence[int], context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over one token sequence `ids` = [eos, t₁, …, t_n, eos].

    Returns (begin, end, scored) per window: inputs ids[begin:end], targets ids[begin+1:end+1], of which
    the last `scored` are counted. Every target ids[1:] is counted exactly once.
    """
    if not 1 <= stride <= context:
        raise EvaluationError(f"stride must be in [1, context={context}], got {stride}")
    n_targets = len(ids) - 1
    windows: list[tuple[int, int, int]] = []
    begin, scored_until = 0, 0
    while scored_until < n_targets:
        end = min(begin + context, n_targets)
        windows.append((begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows


class _Scorer:
    """Σ NLL of the weighted targets of a (B, W) batch, compiled once per width W."""

    def __init__(self, model: Any) -> None:
        @tf.function
        def nll(inputs, targets, weights):
            logits = model(inputs)  # (B, W, V) float32
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            return tf.reduce_sum(tf.cast(losses, tf.float64) * weights)

        self.nll = nll


def evaluate_model(
    model: Any,
    stories: StoryTokens,
    *,
    stride: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of `model` on `stories` (see the module docstring).

    Args:
        model: maps (B, W) int32 ids to (B, W, V) float32 logits and has `config.context`.
        stories: the held-out stories as token sequences, from `tfgpt.data.story_tokens` (e.g. of
            `tfgpt.data.load_stories(source, "validation")`).
        stride: sliding-window stride for stories longer than the context (default context // 2).
        batch_size: windows per forward pass.

    Returns:
        {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "stories", "context", "stride"}.
    """
    context = int(model.config.context)
    stride = context // 2 if stride is None else int(stride)
    if not 1 <= stride <= context:
        raise EvaluationError(f"stride must be in [1, {context}] (the model's context), got {stride}")
    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    if not len(stories):
        raise EvaluationError("no stories to evaluate; check --data and --split")

    rows: list[tuple[np.ndarray, int]] = []  # (window ids: inputs + last target, scored targets)
    for seq in stories.sequences:
        for begin, end, scored in story_windows(seq, context, stride):
            rows.append((seq[begin : end + 1], scored))
    n_tokens = sum(scored for _, scored in rows)

    # Longest windows first, so each batch pads little; widths are multiples of 32 (few traces).
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scorer = _Scorer(model)
    total_nll = 0.0
    bar = tqdm(total=n_tokens, unit="tok", desc="evaluating", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        width = min(context, round_up(max(len(w) - 1 for w, _ in chunk), 32))
        inputs = np.zeros((batch_size, width), np.int32)  # fixed batch: the last batch is padded
        targets = np.zeros((batch_size, width), np.int32)
        weights = np.zeros((batch_size, width), np.float64)
        for r, (window, scored) in enumerate(chunk):
            n = len(window) - 1
            inputs[r, :n], targets[r, :n] = window[:-1], window[1:]
            weights[r, n - scored : n] = 1.0
        total_nll += float(scorer.nll(inputs, targets, weights))
        bar.update(sum(s for _, s in chunk))
    bar.close()
    return summarize(total_nll, n_tokens, stories.bytes) | {"stories": len(stories), "context": context, "stride": stride}


def summarize(total_nll: float, tokens: int, n_bytes: int) -> dict[str, float | int]:
    """loss = NLL/tokens (nats), perplexity = exp(loss), bits_per_byte = NLL / ln 2 / bytes."""
    if tokens <= 0 or n_bytes <= 0:
        raise EvaluationError(f"nothing scored (tokens={tokens}, bytes={n_bytes})")
    loss = total_nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "tokens": int(tokens),
        "bytes": int(n_bytes),
    }


# ------------------------------------------------------------------------------ n-gram baselines
def ngram_nll(train: StoryTokens, test: StoryTokens, vocab_size: int, order: int, alpha: float) -> float:
    """Σ NLL (nats) of the targets of `test` (scored as in `evaluate_model`: every token after the leading
    eos of each story) under a count model fitted on `train`:

        unigram  p(w)   = (c(w) + α) / (N + αV)                       (add-α)
        bigram   p(w|v) = (c(v, w) + α·p_uni(w)) / (c(v) + α)          (Dirichlet prior on the unigram)
    """
    if order not in (1, 2):
        raise EvaluationError(f"order must be 1 (unigram) or 2 (bigram), got {order}")
    if not alpha > 0:
        raise EvaluationError(f"alpha must be > 0, got {alpha}")
    targets = np.concatenate([seq[1:] for seq in train.sequences]).astype(np.int64)
    unigram = (np.bincount(targets, minlength=vocab_size) + alpha) / (len(targets) + alpha * vocab_size)
    test_prev = np.concatenate([seq[:-1] for seq in test.sequences]).astype(np.int64)
    test_next = np.concatenate([seq[1:] for seq in test.sequences]).astype(np.int64)
    if order == 1:
        return float(-np.log(unigram[test_next]).sum())
    prev = np.concatenate([seq[:-1] for seq in train.sequences]).astype(np.int64)
    pairs = collections.Counter(zip(prev.tolist(), targets.tolist(), strict=True))
    pair_counts = np.array([pairs.get(k, 0) for k in zip(test_prev.tolist(), test_next.tolist(), strict=True)])
    context_counts = np.bincount(prev, minlength=vocab_size)[test_prev]
    probs = (pair_counts + alpha * unigram[test_next]) / (context_counts + alpha)
    return float(-np.log(probs).sum())


def ngram_baselines(
    train: StoryTokens, dev: StoryTokens, test: StoryTokens, vocab_size: int,
    alphas: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
) -> dict[str, dict[str, float]]:
    """Unigram and bigram bits per byte on `test`, each with its smoothing α chosen on `dev` (never on test).

    Returns {"unigram": {...}, "bigram": {...}}, each with alpha, dev_bits_per_byte, test_bits_per_byte,
    test_loss (nats/token) and test_perplexity.
    """
    n_test = sum(len(s) - 1 for s in test.sequences)
    out: dict[str, dict[str, float]] = {}
    for name, order in (("unigram", 1), ("bigram", 2)):
        dev_bpb = {a: ngram_nll(train, dev, vocab_size, order, a) / math.log(2) / dev.bytes for a in alphas}
        alpha = min(dev_bpb, key=dev_bpb.__getitem__)
        nll = ngram_nll(train, test, vocab_size, order, alpha)
        out[name] = {"alpha": alpha, "dev_bits_per_byte": dev_bpb[alpha],
                     "test_bits_per_byte": nll / math.log(2) / test.bytes,
                     "test_loss": nll / n_test, "test_perplexity": math.exp(nll / n_test)}
    return out


# --------------------------------------------------------------------------- sample quality
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of `text`."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def sample_statistics(
    texts: Sequence[str], ended_with_eos: Sequence[bool] | None = None, *, repetition_n: int = 4
) -> dict[str, Any]:
    """distinct_1, distinct_2, repetition_rate (seq-rep-n) and eos_rate of sampled texts.

    eos_rate is None when `ended_with_eos` is not given. Samples too short for an n-gram add nothing
    to that measure (a measure with nothing counted is 0.0).
    """
    tokenized = [words(t) for t in texts]

    def distinct(n: int) -> float:
        grams = [g for toks in tokenized for g in _ngrams(toks, n)]
        return len(set(grams)) / len(grams) if grams else 0.0

    reps = []
    for toks in tokenized:
        grams = _ngrams(toks, repetition_n)
        if grams:
            reps.append(1.0 - len(set(grams)) / len(grams))
    eos_rate = None
    if ended_with_eos is not None:
        if len(ended_with_eos) != len(texts):
            raise EvaluationError(f"{len(ended_with_eos)} eos flags for {len(texts)} texts")
        eos_rate = float(np.mean(ended_with_eos)) if len(texts) else 0.0
    return {
        "distinct_1": distinct(1),
        "distinct_2": distinct(2),
        "repetition_rate": float(np.mean(reps)) if reps else 0.0,
        "eos_rate": eos_rate,
        "samples": len(texts),
        "mean_words": float(np.mean([len(t) for t in tokenized])) if texts else 0.0,
    }


def sample_quality(
    model: Any,
    tokenizer: Any,
    num_samples: int = 32,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    jit_compile: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Sample `num_samples` stories from scratch (prompt = [eos]) and return (sample_statistics, texts).

    Sample k uses seed `seed + k`, so the samples are reproducible.
    """
    if num_samples < 1:
        raise EvaluationError(f"number of samples must be >= 1, got {num_samples}")
    eos = int(tokenizer.eos_id)
    texts: list[str] = []
    ended: list[bool] = []
    batch = min(batch_size, num_samples)  # every call has this batch size: one compiled graph
    for start in range(0, num_samples, batch):
        new = generate(model, [[eos]] * batch, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed + start, eos_id=eos, jit_compile=jit_compile)
        for ids in new[: num_samples - start]:
            ended.append(bool(ids) and ids[-1] == eos)
            texts.append(completion_text(tokenizer, [eos], ids))
    return sample_statistics(texts, ended), texts


# ------------------------------------------------------------------------------- one evaluation
def evaluate_source(
    model: Any,
    tokenizer: Any,
    source: str,
    split: str | None = None,
    *,
    val_fraction: float = 0.05,
    stride: int | None = None,
    batch_size: int = 16,
    max_stories: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`evaluate_model` on the stories of `split` of `source` (a `tfgpt.data` source).

    split=None scores the source's own validation split where it has one (a "valid" file, a dataset's
    validation split), and otherwise *all* of its stories (a lone text file is all held-out text); an
    explicit "validation" on such a source scores its hash-split side (`val_fraction` of the stories).
    Returns the scores with "data" and "split" (the split actually scored) added.
    """
    from tfgpt.data import story_tokens
    from tfgpt.stories import DataError, has_validation_split, load_stories

    if split is None:
        split = "validation" if has_validation_split(source) else "all"
    try:
        stories = story_tokens(load_stories(source, split, val_fraction=val_fraction), tokenizer,
                               max_stories=max_stories)
    except DataError as exc:
        raise EvaluationError(str(exc)) from None
    scores = evaluate_model(model, stories, stride=stride, batch_size=batch_size, progress=progress)
    return {"data": source, "split": split, **scores}


def report_lines(record: dict[str, Any]) -> list[str]:
    """The lines `evaluate.py` prints for a record of `evaluate_source` (+ "model", "parameters",
    and "samples" from `sample_quality` with its settings, or None)."""
    lines = [
        f"model {record['model']} ({record['parameters']:,} parameters, context {record['context']}) "
        f"on {record['data']} [{record['split']}]: scored {record['stories']:,} stories, {record['tokens']:,} "
        f"tokens, {record['bytes']:,} bytes (stride {record['stride']})",
        f"loss {record['loss']:.4f} nats/token | perplexity {record['perplexity']:.3f} | "
        f"bits per byte {record['bits_per_byte']:.4f} | {record['tokens']:,} tokens",
    ]
    s = record.get("samples")
    if s:
        lines.append(
            f"samples: {s['samples']} (temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}, "
            f"seed {s['seed']}, max {s['max_new_tokens']} tokens): distinct-1 {s['distinct_1']:.3f} | "
            f"distinct-2 {s['distinct_2']:.3f} | repetition rate {s['repetition_rate']:.3f} | "
            f"ended with end-of-text {s['eos_rate']:.1%}"
        )
    return lines


def run_evaluation(
    model: Any,
    tokenizer: Any,
    *,
    model_path: str | Path | None,
    data: str,
    split: str | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    max_stories: int | None = None,
    samples: int = 32,
    sample_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    jit_compile: bool = True,
    progress: bool = True,
    json_path: str | Path | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """What `python evaluate.py` does: `evaluate_source`, then `samples` stories from scratch for
    `sample_quality` (0 = none), the `report_lines` printed to `out` (stdout), and the record written to
    `json_path` when given. `model_path` names the model in the record (None = the shipped run).
    Returns the record; raises EvaluationError."""
    from tfgpt.common import repo_relative, write_json
    from tfgpt.runs import DEFAULT_MODEL

    out = out or sys.stdout
    record = evaluate_source(model, tokenizer, data, split, stride=stride, batch_size=batch_size,
                             max_stories=max_stories, progress=progress)
    quality = None
    if samples:
        stats, _ = sample_quality(model, tokenizer, samples, max_new_tokens=sample_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, jit_compile=jit_compile)
        quality = {**stats, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                   "max_new_tokens": sample_tokens}
    record = {"model": repo_relative(model_path or DEFAULT_MODEL), "parameters": model.count_params(),
              **record, "data": repo_relative(data), "samples": quality}
    print("\n".join(report_lines(record)), file=out)
    if json_path:
        write_json(json_path, record)
        print(f"wrote {json_path}", file=out)
    return record

