"""Evaluation: windows, loss/perplexity/bits-per-byte against hand computations, sample statistics, the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import tiny_run

from tfgpt import GPTConfig, build_model
from tfgpt.data import story_tokens
from tfgpt.evaluation import (
    EvaluationError,
    evaluate_model,
    sample_quality,
    sample_statistics,
    story_windows,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
STORIES = [  # invented text
    "Tom had a red ball. He threw it to his dog, and the dog ran after it.",
    "Mia found a small blue stone in the garden. She gave it to her mom, who smiled. "
    "Then they planted flowers together until the sun went down, and both of them were happy.",
    "The end.",
]


class ByteTokenizer:
    """Test tokenizer: one token per UTF-8 byte (ids 4..259), eos = 3."""

    eos_id = 3

    def encode_batch(self, texts):
        return [[b + 4 for b in t.encode("utf-8")] for t in texts]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tinystories_dir):
    return tiny_run(tmp_path_factory.getbasetemp(), tinystories_dir)


# ------------------------------------------------------------------------------- windows
@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), context=st.integers(1, 64), data=st.data())
def test_windows_score_every_target_once_with_enough_context(n, context, data):
    stride = data.draw(st.integers(1, context))
    windows = story_windows(list(range(n)), context, stride)
    scored = []
    for begin, end, count in windows:
        assert 0 <= begin < end <= n - 1 and end - begin <= context and 1 <= count <= end - begin
        targets = list(range(begin + 1, end + 1))[-count:]  # absolute positions of the scored targets
        for t in targets:  # target t is predicted from inputs begin..t-1
            assert t - begin >= min(t, context - stride + 1)
        scored += targets
    assert scored == list(range(1, n))


def test_short_story_is_one_window():
    assert story_windows([3, 10, 11, 3], 64, 32) == [(0, 3, 3)]
    assert story_windows(list(range(10)), 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 9, 1)]
    with pytest.raises(EvaluationError, match="stride"):
        story_windows([3, 4], 8, 9)


# --------------------------------------------------------------------------------- scores
def test_summarize_by_hand():
    # 3 tokens with probabilities 1/2, 1/4, 1/8 -> NLL = 6 ln 2; 4 bytes -> 6 bits / 4 bytes
    out = summarize(6 * math.log(2), 3, 4)
    assert out["loss"] == pytest.approx(2 * math.log(2))
    assert out["perplexity"] == pytest.approx(4.0)
    assert out["bits_per_byte"] == pytest.approx(1.5)
    with pytest.raises(EvaluationError):
        summarize(1.0, 0, 4)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    model = build_model(GPTConfig.from_preset("tiny"))  # tied embeddings: E = 0 gives logits = 0
    model.embedding.token_embeddings.assign(np.zeros(model.embedding.token_embeddings.shape, np.float32))
    vocab = model.config.vocab_size
    out = evaluate_model(model, story_tokens(STORIES, ByteTokenizer()), stride=32, batch_size=4, progress=False)
    n_bytes = sum(len(s.encode()) for s in STORIES)
    assert out["tokens"] == n_bytes + len(STORIES)  # every byte plus each story's closing eos
    assert out["bytes"] == n_bytes
    assert out["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(out["tokens"] * math.log2(vocab) / n_bytes, rel=1e-5)


def test_sliding_window_loss_equals_a_per_token_reference():
    model = build_model(GPTConfig.from_preset("tiny"))
    context = model.config.context
    story = STORIES[1]  # 167 bytes: longer than the 64-token context
    seq = [3, *ByteTokenizer().encode_batch([story])[0], 3]
    # target t with the longest left context the window allows: seq[max(0, t − T) : t], one row per
    # target, right-padded (causal attention: the padding cannot reach the last real position)
    windows = np.zeros((len(seq) - 1, context), np.int32)
    last = np.zeros(len(seq) - 1, np.int64)
    for t in range(1, len(seq)):
        left = seq[max(0, t - context) : t]
        windows[t - 1, : len(left)], last[t - 1] = left, len(left) - 1
    logits = np.asarray(model(windows)).astype(np.float64)[np.arange(len(last)), last]  # (targets, V)
    top = logits.max(axis=-1)
    nll = float(np.sum(np.log(np.exp(logits - top[:, None]).sum(-1)) + top - logits[np.arange(len(last)), seq[1:]]))
    out = evaluate_model(model, story_tokens([story], ByteTokenizer()), stride=1, batch_size=64, progress=False)
    assert out["tokens"] == len(seq) - 1
    assert out["loss"] * out["tokens"] == pytest.approx(nll, rel=1e-5)
    # batching and padding do not change the result
    a = evaluate_model(model, story_tokens(STORIES, ByteTokenizer()), batch_size=1, progress=False)
    b = evaluate_model(model, story_tokens(STORIES, ByteTokenizer()), batch_size=5, progress=False)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_bad_evaluation_arguments():
    model = build_model(GPTConfig.from_preset("tiny"))
    with pytest.raises(EvaluationError, match="stride must be in"):
        evaluate_model(model, story_tokens(STORIES, ByteTokenizer()), stride=65, progress=False)
    with pytest.raises(EvaluationError, match="no stories"):
        evaluate_model(model, story_tokens([], ByteTokenizer()), progress=False)


# ------------------------------------------------------------------------- sample quality
def test_sample_statistics_by_hand():
    texts = ["the cat sat on the mat", "a a a a a a"]
    out = sample_statistics(texts, [True, False])
    # unigrams: 6 + 6 = 12, distinct {the, cat, sat, on, mat, a} = 6
    assert out["distinct_1"] == pytest.approx(6 / 12)
    # bigrams: 5 + 5 = 10, distinct: 5 from the first text + ("a", "a") = 6
    assert out["distinct_2"] == pytest.approx(6 / 10)
    # 4-grams: first text 3 distinct of 3 (rep 0), second 1 distinct of 3 (rep 2/3)
    assert out["repetition_rate"] == pytest.approx((0 + 2 / 3) / 2)
    assert out["eos_rate"] == 0.5
    assert sample_statistics(["Hi!"])["eos_rate"] is None


def test_sample_quality_of_the_tiny_model(trained):
    _, model, tokenizer = trained
    stats, texts = sample_quality(model, tokenizer, 5, max_new_tokens=40, batch_size=4, seed=2, jit_compile=False)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    again, texts_again = sample_quality(model, tokenizer, 5, max_new_tokens=40, batch_size=4, seed=2,
                                        jit_compile=False)
    assert texts_again == texts and again == stats
    # The same stories as generate() from [eos] in batches of 4 with seeds 2 and 2 + 4 (sample k uses seed + k),
    # and the statistics of those stories, with eos_rate = the share that ended with the end-of-text token.
    from tfgpt.generation import completion_text, generate

    eos = tokenizer.eos_id
    ids = [*generate(model, [[eos]] * 4, 40, seed=2, eos_id=eos, jit_compile=False),
           *generate(model, [[eos]] * 4, 40, seed=6, eos_id=eos, jit_compile=False)[:1]]
    assert texts == [completion_text(tokenizer, [eos], new) for new in ids]
    ended = [bool(new) and new[-1] == eos for new in ids]
    assert stats == sample_statistics(texts, ended) and stats["eos_rate"] == pytest.approx(sum(ended) / 5)


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stride", "0"], "argument --stride: must be an integer >= 1"),
        (["--samples", "-1"], "argument --samples: must be an integer >= 0"),
        (["--model", "missing/run"], "model path missing/run does not exist"),
        (["--json", "nowhere/eval.json"], "--json nowhere/eval.json: folder nowhere does not exist; create it"),
        (["--json", "."], r"--json \. is a directory; name a file"),
    ],
)
def test_cli_rejects_bad_values_with_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), proc.stderr


def test_cli_reports_scores_and_writes_json(trained, tinystories_dir, tmp_path, capsys):
    import evaluate as cli
    from tfgpt.data import load_stories

    run, model, tokenizer = trained
    out_json = tmp_path / "eval.json"
    code = cli.main(["--model", str(run), "--data", str(tinystories_dir), "--max-stories", "12", "--samples", "3",
                     "--sample-tokens", "20", "--no-xla", "--no-progress", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads(out_json.read_text())
    assert record["split"] == "validation" and record["stories"] == 12
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert f"perplexity {record['perplexity']:.3f}" in printed and "bits per byte" in printed
    assert f"{record['tokens']:,} tokens" in printed
    expected = evaluate_model(model, story_tokens(load_stories(str(tinystories_dir), "validation"), tokenizer,
                                                  max_stories=12), progress=False)
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert record["samples"]["samples"] == 3 and 0 <= record["samples"]["eos_rate"] <= 1
    assert f"scored 12 stories, {record['tokens']:,} tokens, {record['bytes']:,} bytes" in printed

    # A lone file has no validation split: all of its stories are scored (not the 5 % hash-split side).
    stories = list(load_stories(str(tinystories_dir / "TinyStories-valid.head.txt.xz"), "all"))[:15]
    lone = tmp_path / "mine.txt"
    lone.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    assert cli.main(["--model", str(run), "--data", str(lone), "--samples", "0", "--no-progress",
                     "--json", str(out_json)]) == 0
    record = json.loads(out_json.read_text())
    assert record["split"] == "all" and record["stories"] == 15

    # A last story without a separator after it is scored too; a tail cut off mid-sentence is not.
    for tail, n in (("\n", 3), ("", 3), ("\n<|endoftext|>\nShe said it was", 3)):
        lone.write_text(f"{stories[0]}\n<|endoftext|>\n{stories[1]}\n<|endoftext|>\n{stories[2]}{tail}")
        assert cli.main(["--model", str(run), "--data", str(lone), "--samples", "0", "--no-progress",
                         "--json", str(out_json)]) == 0
        assert json.loads(out_json.read_text())["stories"] == n, repr(tail)
    assert "[all]: scored 15 stories" in capsys.readouterr().out
    # An explicit --split validation is honoured: the hash-split side, here none of the 15 stories.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(run), "--data", str(lone), "--split", "validation", "--samples", "0", "--no-progress"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: no stories found in the validation split of {lone}")


def test_cli_json_paths_are_relative_to_the_repository(trained, tmp_path, monkeypatch, capsys):
    import evaluate as cli

    run, _, _ = trained
    monkeypatch.chdir(REPO)
    out_json = tmp_path / "eval.json"
    assert cli.main(["--model", str(run), "--max-stories", "2", "--samples", "0", "--no-progress",
                     "--json", str(out_json)]) == 0
    record = json.loads(out_json.read_text())
    assert record["data"] == "data/tinystories" and record["split"] == "validation"
    assert str(REPO) not in out_json.read_text()


# ------------------------------------------------------------------------------ n-gram baselines
def test_ngram_nll_against_hand_computation():
    from tfgpt.data import StoryTokens
    from tfgpt.evaluation import ngram_baselines, ngram_nll

    train = StoryTokens([np.array([3, 5, 6, 3])], 10)  # targets 5 6 3; bigrams (3,5) (5,6) (6,3)
    test = StoryTokens([np.array([3, 5, 3])], 4)  # targets 5 3; bigrams (3,5) (5,3)
    uni = lambda w: ({5: 1, 6: 1, 3: 1}.get(w, 0) + 1.0) / (3 + 8)  # noqa: E731  add-1, V = 8
    assert ngram_nll(train, test, 8, 1, 1.0) == pytest.approx(-math.log(uni(5)) - math.log(uni(3)))
    p_5_after_3 = (1 + uni(5)) / (1 + 1)
    p_3_after_5 = (0 + uni(3)) / (1 + 1)
    assert ngram_nll(train, test, 8, 2, 1.0) == pytest.approx(-math.log(p_5_after_3) - math.log(p_3_after_5))
    with pytest.raises(EvaluationError, match="order must be"):
        ngram_nll(train, test, 8, 3, 1.0)
    # alpha is chosen on dev: with dev == test the reported test figure is the best over the grid
    out = ngram_baselines(train, test, test, 8, alphas=(0.1, 1.0, 10.0))
    best = min(ngram_nll(train, test, 8, 2, a) for a in (0.1, 1.0, 10.0))
    assert out["bigram"]["test_bits_per_byte"] == pytest.approx(best / math.log(2) / 4)
    assert out["bigram"]["dev_bits_per_byte"] == out["bigram"]["test_bits_per_byte"]
