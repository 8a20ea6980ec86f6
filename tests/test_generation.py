"""Generation: samplers on controlled logits, the cached loop against references, seeds, retracing, the CLI.

`tiny_run` (shared with test_evaluation.py and test_export.py) trains a tiny SentencePiece tokenizer and
a tiny GPT on a slice of the shared TinyStories text, once per session, into a run directory.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfgpt import GPTConfig, build_model
from tfgpt.generation import (
    GenerationError,
    compiled,
    generate,
    generate_text,
    prompt_token_ids,
    stream,
)
from tfgpt.runs import RunError, load_model
from tfgpt.sampling import filter_logits, sample_logits

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- fixture
@functools.cache
def tiny_run(base: Path, data_dir: Path) -> tuple[Path, keras.Model, object]:
    """(run dir, model, tokenizer): vocab-512 tokenizer and a `tiny` GPT trained 150 steps on 400 stories."""
    from tfgpt.data import load_stories, make_dataset, token_stream
    from tfgpt.tokenizer import train_tokenizer

    run = base / "tiny_run"
    run.mkdir(parents=True, exist_ok=True)
    train_file = data_dir / "TinyStories-train.head-2MiB.txt.xz"
    stories = [s for _, s in zip(range(400), load_stories(str(train_file), "all"), strict=False)]
    tokenizer = train_tokenizer(stories, 512, run / "tokenizer")
    slice_file = base / "slice.txt"  # a temporary file, never in the repo
    slice_file.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    tokens = token_stream(str(slice_file), tokenizer, "all", cache_dir=base / "token-cache")
    config = GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    keras.utils.set_random_seed(0)
    model = build_model(config)
    model.compile(optimizer=keras.optimizers.Adam(5e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(make_dataset(tokens, config.context, 16, repeat=True), steps_per_epoch=150, epochs=1, verbose=0)
    model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"model": config.to_dict(), "tokenizer": "tokenizer"}))
    model = keras.saving.load_model(run / "model.keras", compile=False)  # as the CLIs see it: no optimizer
    return run, model, tokenizer


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tinystories_dir):
    return tiny_run(tmp_path_factory.getbasetemp(), tinystories_dir)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """nanoGPT's loop: run the whole sequence through the model and take the argmax, n times."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(np.array([seq], np.int32))[0, -1]
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


# ------------------------------------------------------------------------------ samplers
def test_filter_logits_top_k_keeps_exactly_the_k_largest():
    logits = tf.constant([[0.3, 2.0, -1.0, 1.5, 0.9, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = np.isfinite(filter_logits(logits, 3, 1.0).numpy())
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, 0, 1.0).numpy()), True)  # off
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, 99, 1.0).numpy()), True)  # k > V


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (0, 0.5, [1, 0, 0, 0]),  # p(0) = 0.5 already reaches 0.5
        (0, 0.6, [1, 1, 0, 0]),
        (0, 0.76, [1, 1, 1, 0]),
        (0, 1e-6, [1, 0, 0, 0]),
        (0, 1.0, [1, 1, 1, 1]),
        (2, 0.9, [1, 1, 0, 0]),  # top-k first
        (3, 0.8, [1, 1, 0, 0]),  # then top-p on the renormalised top-3: 0.5/0.9, 0.25/0.9 = 0.83
    ],
)
def test_filter_logits_top_p_keeps_the_nucleus(top_k, top_p, expected):
    logits = tf.math.log(tf.constant([[0.5, 0.25, 0.15, 0.10]]))
    kept = np.isfinite(filter_logits(logits, top_k, top_p).numpy())[0]
    np.testing.assert_array_equal(kept, np.array(expected, bool))


def test_filter_logits_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype(np.float32) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 0.95)]:
        got = np.isfinite(filter_logits(logits, top_k, top_p).numpy())
        for row, kept in zip(logits, got, strict=True):
            order = np.argsort(-row)
            probs = np.exp(row[order[: top_k or 50]] - row.max())
            probs /= probs.sum()
            n = min(int(np.searchsorted(np.cumsum(probs), top_p) + 1), len(probs))
            assert set(np.flatnonzero(kept)) == set(order[:n])


def test_sampled_tokens_follow_the_filtered_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = tf.constant(np.tile(np.log(probs), (4000, 1)), tf.float32)
    seeds = tf.range(4000, dtype=tf.int64)
    sample = tf.function(sample_logits)  # as in the decoding loop (eager map_fn over 4000 rows is slow)
    for top_k, top_p, support in [(3, 1.0, [0, 1, 2]), (0, 0.65, [0, 1]), (0, 1.0, [0, 1, 2, 3, 4])]:
        draws = sample(logits, 1.0, top_k, top_p, seeds, step=7).numpy()
        assert set(draws) == set(support)
        freq = np.bincount(draws, minlength=5)[support] / len(draws)
        np.testing.assert_allclose(freq, probs[support] / probs[support].sum(), atol=0.035)
    # a temperature sharpens the distribution: p^(1/T) renormalised
    draws = sample(logits, 0.5, 0, 1.0, seeds, step=7).numpy()
    sharp = probs**2 / (probs**2).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), sharp, atol=0.035)


def test_sampling_is_a_function_of_row_seed_and_step():
    logits = tf.constant(np.random.default_rng(1).normal(size=(3, 40)), tf.float32)
    a = sample_logits(logits, 1.0, 0, 1.0, tf.constant([5, 6, 7], tf.int64), step=3).numpy()
    b = sample_logits(logits, 1.0, 0, 1.0, tf.constant([5, 6, 7], tf.int64), step=3).numpy()
    np.testing.assert_array_equal(a, b)
    alone = sample_logits(logits[1:2], 1.0, 0, 1.0, tf.constant([6], tf.int64), step=3).numpy()
    assert alone[0] == a[1]  # a row's draw does not depend on the others
    draws = {tuple(sample_logits(logits, 1.0, 0, 1.0, tf.constant([5, 6, 7], tf.int64), step=s).numpy())
             for s in range(8)}
    assert len(draws) > 1
    greedy = np.argmax(logits.numpy(), axis=-1)
    np.testing.assert_array_equal(sample_logits(logits, 0.0, 0, 1.0, tf.constant([5, 6, 7], tf.int64)), greedy)
    np.testing.assert_array_equal(sample_logits(logits, 1e-4, 0, 1.0, tf.constant([5, 6, 7], tf.int64)), greedy)


def test_samplers_by_name_and_a_registered_one(trained):
    from tfgpt.sampling import SAMPLERS, Sampler, get_sampler, register_sampler

    _, model, _ = trained
    prompts = [[3, 50, 51], [3]]
    greedy = generate(model, prompts, 12, temperature=0.0, jit_compile=False)
    assert generate(model, prompts, 12, temperature=1.0, seed=2, sampler="greedy", jit_compile=False) == greedy
    assert generate(model, prompts, 12, temperature=1.0, top_k=1, seed=2, sampler="top_k", jit_compile=False) == greedy
    # "temperature" ignores top_k: with top_k=1 it still samples the whole distribution
    kwargs = {"temperature": 1.0, "top_k": 1, "seed": 2, "jit_compile": False}
    assert generate(model, prompts, 12, sampler="temperature", **kwargs) == generate(
        model, prompts, 12, **{**kwargs, "top_k": 0})

    @register_sampler("test_second_best")
    class SecondBest(Sampler):
        def get_next_token(self, logits, settings, seeds, step):
            return tf.math.top_k(logits, 2).indices[:, 1]

    try:
        assert isinstance(get_sampler("test_second_best"), SecondBest)
        out = generate(model, [[3, 50, 51]], 4, sampler="test_second_best", jit_compile=False)
        expected, seq = [], [3, 50, 51]
        for _ in range(4):
            expected.append(int(np.argsort(np.asarray(model(np.array([seq]))[0, -1]))[-2]))
            seq.append(expected[-1])
        assert out == [expected]
    finally:
        SAMPLERS.pop("test_second_best")
    with pytest.raises(GenerationError, match="unknown sampler 'nope'; use one of default, greedy"):
        generate(model, prompts, 4, sampler="nope")


# ------------------------------------------------------------------------- the decoding loop
def test_cached_greedy_equals_the_uncached_loop_and_the_reference(trained):
    _, model, _ = trained
    prompts = [[3, 40, 41, 42], [3], [3, *range(100, 118)]]  # lengths 4, 1, 19: two prompt buckets
    cached = generate(model, prompts, 16, temperature=0.0, jit_compile=False)
    assert cached == generate(model, prompts, 16, temperature=0.0, use_cache=False, jit_compile=False)
    assert cached == [greedy_reference(model, p, 16) for p in prompts]
    # batch rows equal each prompt generated alone
    assert cached == [generate(model, [p], 16, temperature=0.0, jit_compile=False)[0] for p in prompts]


def test_generation_past_the_context_slides_the_window(trained):
    _, model, _ = trained
    context = model.config.context  # 64: 100 new tokens refill the cache (every 16 tokens past 64)
    prompts = [[3, 12, 13], [3, *range(200, 250)]]
    cached = generate(model, prompts, 100, temperature=0.0, jit_compile=False)
    assert [len(c) for c in cached] == [100, 100]
    assert cached == generate(model, prompts, 100, temperature=0.0, use_cache=False, jit_compile=False)
    # inside the context the tokens equal the full-sequence reference
    assert cached[1][: context - 51] == greedy_reference(model, prompts[1], context - 51)


def test_sampling_settings_that_reduce_to_greedy(trained):
    _, model, _ = trained
    prompts = [[3, 50, 51], [3]]
    greedy = generate(model, prompts, 30, temperature=0.0, jit_compile=False)
    for sampling in ({"top_k": 1}, {"top_p": 1e-6}):
        assert generate(model, prompts, 30, seed=3, jit_compile=False, **{"temperature": 1.0, **sampling}) == greedy
    # A tiny temperature is greedy except where the two best logits are within a few temperatures of each
    # other (a near tie is then a fair coin, not a bug): the first divergence, if any, must be such a tie.
    cold = generate(model, prompts, 30, seed=3, temperature=1e-4, jit_compile=False)
    for prompt, row_cold, row_greedy in zip(prompts, cold, greedy, strict=True):
        k = next((i for i, (a, b) in enumerate(zip(row_cold, row_greedy, strict=True)) if a != b), None)
        if k is not None:
            logits = np.asarray(model(np.array([prompt + row_greedy[:k]]))[0, -1])
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < 2e-3, (k, top2)
            assert {row_cold[k], row_greedy[k]} <= set(np.argsort(logits)[-2:].tolist())


def test_seeds_reproduce_and_rows_are_independent(trained):
    _, model, _ = trained
    prompts = [[3, 50, 51], [3], [3, 7]]
    kwargs = {"temperature": 1.0, "top_p": 0.95, "jit_compile": False}
    a = generate(model, prompts, 30, seed=11, **kwargs)
    assert a == generate(model, prompts, 30, seed=11, **kwargs)
    assert a != generate(model, prompts, 30, seed=12, **kwargs)
    assert a == [generate(model, [p], 30, seed=11 + r, **kwargs)[0] for r, p in enumerate(prompts)]


def test_stream_yields_the_same_tokens_as_generate(trained):
    _, model, _ = trained
    prompts = [[3, 50, 51, 52, 53], [3]]
    kwargs = {"temperature": 0.9, "top_k": 20, "seed": 4, "jit_compile": False}
    steps = list(stream(model, prompts, 20, **kwargs))
    streamed = [[s[r] for s in steps if s[r] is not None] for r in range(2)]
    assert streamed == generate(model, prompts, 20, **kwargs)
    assert steps[0] == [None, streamed[1][0]]  # row 0 is still in its prompt at position 1


def test_xla_loop_is_traced_once_per_shape(trained):
    _, model, _ = trained
    generate(model, [[3, 5, 6]], 20, temperature=0.0)  # compile (batch 1, prompt bucket 16, length 64)
    run = compiled(model).run
    traces = run.experimental_get_tracing_count()
    greedy = generate(model, [[3, 9, 10, 11]], 20, temperature=0.0)
    generate(model, [[3]], 18, temperature=0.7, top_k=5, top_p=0.9, seed=1, eos_id=3)
    assert run.experimental_get_tracing_count() == traces
    assert greedy == generate(model, [[3, 9, 10, 11]], 20, temperature=0.0, jit_compile=False)


def test_a_row_stops_after_the_end_token(trained):
    _, model, _ = trained
    free = generate(model, [[3, 60], [3]], 12, temperature=0.0, jit_compile=False)
    stop = free[0][4]  # pretend the 5th token of row 0 is the end-of-text token
    out = generate(model, [[3, 60], [3]], 12, temperature=0.0, eos_id=stop, jit_compile=False)
    for row, ids in zip(free, out, strict=True):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert ids == row[:cut]
    assert out[0][-1] == stop and len(out[0]) <= 5


def test_long_prompts_keep_their_last_tokens(trained):
    _, model, _ = trained
    context = model.config.context
    long_prompt = [3, *range(10, 10 + context + 20)]
    with pytest.warns(UserWarning, match="keeping its last 64 tokens"):
        out = generate(model, [long_prompt], 5, temperature=0.0, jit_compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert out == generate(model, [long_prompt[-context:]], 5, temperature=0.0, jit_compile=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"prompt_ids": [[]]}, "prompt 0 is empty"),
        ({"prompt_ids": [[3, 10**6]]}, r"outside \[0, 512\)"),
    ],
)
def test_bad_arguments_raise_generation_error(kwargs, message):
    model = build_model(GPTConfig.from_preset("tiny"))
    args = {"prompt_ids": [[3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError, match=message):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)


# ------------------------------------------------------------------------------- text level
def test_generate_text_continues_the_prompt(trained):
    _, model, tokenizer = trained
    texts = generate_text(model, tokenizer, ["Once upon a time", ""], 40, temperature=0.0, jit_compile=False)
    ids = [prompt_token_ids(tokenizer, p) for p in ["Once upon a time", ""]]
    new = generate(model, ids, 40, temperature=0.0, eos_id=tokenizer.eos_id, jit_compile=False)
    assert ids[1] == [tokenizer.eos_id]
    for prompt, text, prompt_ids, new_ids in zip(["Once upon a time", ""], texts, ids, new, strict=True):
        assert prompt + text == tokenizer.decode(prompt_ids + new_ids)
        assert text.strip()


def test_load_model_from_a_run_directory(trained, tmp_path):
    run, model, tokenizer = trained
    loaded, tok = load_model(run)
    assert tok.sha256 == tokenizer.sha256
    np.testing.assert_allclose(loaded(np.array([[3, 4, 5]])), model(np.array([[3, 4, 5]])), atol=1e-6)
    with pytest.raises(RunError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(RunError, match="no model.keras"):
        load_model(tmp_path)


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "argument --temperature: must be >= 0"),
        (["--top-p", "0"], r"argument --top-p: must be in \(0, 1\]"),
        (["--top-p", "1.5"], r"argument --top-p: must be in \(0, 1\]"),
        (["--top-k", "-2"], "argument --top-k: must be an integer >= 0"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
        (["--model", "no/such/run"], "model path no/such/run does not exist"),
        (["--prompt", os.fsdecode(b"Tom \xff\xfe")], r"--prompt b'Tom \\xff\\xfe' is not valid UTF-8 \(byte 0xff"),
    ],
)
def test_cli_rejects_bad_values_with_one_line(args, message, tmp_path):
    # Subprocesses: these exit before TensorFlow is imported, so each takes a fraction of a second.
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert proc.stdout == ""


def test_cli_prints_stories_batched_or_streamed(trained, monkeypatch, capsys):
    import generate as cli

    run, model, tokenizer = trained
    monkeypatch.setattr("tfgpt.runs.DEFAULT_MODEL", run)  # `python generate.py` with no --model
    common = ["--temperature", "0.8", "--seed", "5", "--max-new-tokens", "30", "--no-xla",
              "--prompt", "Once upon a time", "--prompt", "", "--num-samples", "2"]
    assert cli.main([*common, "--no-stream"]) == 0
    batched = capsys.readouterr().out
    assert cli.main([*common, "--stream"]) == 0
    assert capsys.readouterr().out == batched  # sample k uses seed + k either way
    stories = batched.split("--- sample ")[1:]
    assert len(stories) == 4 and stories[0].startswith("1 ---\nOnce upon a time")
    expected = generate_text(model, tokenizer, ["Once upon a time"], 30, temperature=0.8, seed=5, jit_compile=False)
    assert stories[0] == f"1 ---\nOnce upon a time{expected[0]}\n"

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Tom saw a dog.\nquit\n"))
    assert cli.main(["--interactive", "--temperature", "0", "--max-new-tokens", "10", "--no-xla", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("prompt> Tom saw a dog.")

    monkeypatch.setattr("tfgpt.runs.DEFAULT_MODEL", run / "missing")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: no model at {run / 'missing'}; train one")


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])  # stdin strict (a UTF-8 locale) or surrogateescape (C)
def test_interactive_reports_a_line_that_is_not_utf8_and_carries_on(trained, tmp_path, locale):
    run = trained[0]
    env = {**os.environ, "LC_ALL": locale, "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(run), "--interactive",
                           "--max-new-tokens", "5", "--temperature", "0", "--no-xla", "--no-stream"],
                          cwd=tmp_path, input=b"Tom \xff\xfe went\nTom went\nquit\n", capture_output=True,
                          timeout=300, env=env)  # fmt: skip
    err = [line for line in proc.stderr.decode().splitlines() if line.startswith("error: ")]
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert err == ["error: that prompt is not valid UTF-8 (byte 0xff at character 4); pass UTF-8 text; "
                   "type it again"]
    assert proc.stdout.decode().count("Tom went") == 1  # the next prompt was answered


@pytest.mark.parametrize(("damage", "message"), [
    ("empty", r"model.keras is empty; restore it, or retrain the run"),
    ("truncated", r"model.keras is damaged \([\d,]+ bytes, not a zip archive\); restore it"),
    ("config", r"config.json is not valid JSON \(Expecting .*\); restore it from the run or delete it"),
])  # fmt: skip
def test_a_damaged_run_is_one_error_line_and_left_as_it_is(trained, tmp_path, damage, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    if damage == "config":
        (run / "config.json").write_text('{"model": {"vocab_size": 512,')
    else:
        model_file = run / "model.keras"
        model_file.write_bytes(b"" if damage == "empty" else model_file.read_bytes()[:4000])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(run), "--no-xla"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {run}/"), proc.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_bare_keras_file_is_checked_against_its_runs_tokenizer(trained, tmp_path):
    import shutil

    from tfgpt.tokenizer import Tokenizer, train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    config = json.loads((run / "config.json").read_text())
    config["tokenizer_info"] = {"sha256": Tokenizer.load(run / "tokenizer").sha256}
    (run / "config.json").write_text(json.dumps(config))
    other = train_tokenizer([f"Zed and Ana saw {i} frogs by the pond today." for i in range(300)], 300,
                            tmp_path / "other")
    args = ["--no-xla", "--max-new-tokens", "4", "--temperature", "0", "--no-stream"]
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(run / "model.keras"),
                           "--tokenizer", str(other.path.parent), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"is not the one {run} was trained with" in lines[0] and proc.stdout == ""

    lone = tmp_path / "lone"  # no config.json beside it: it loads, and says the tokenizer is unverified
    lone.mkdir()
    shutil.copy(run / "model.keras", lone / "model.keras")
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(lone / "model.keras"),
                           "--tokenizer", str(run / "tokenizer"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"warning: tokenizer {run / 'tokenizer' / 'tokenizer.model'} is "
                                                f"unverified: no config.json beside {lone / 'model.keras'} records "
                                                "the tokenizer it was trained with"]
    assert proc.stdout.startswith("Once upon a time")
