"""tfgpt.training.job and train_keras.py: a short run and its files, exact resume after SIGKILL, time
budget, mirrored over two logical CPUs, mixed precision, the command line (bad input, quick runs, no
network)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import train_keras
from tfgpt.common import EOT, REPO_ROOT
from tfgpt.data import load_stories
from tfgpt.runs import read_backup_meta
from tfgpt.tokenizer import Tokenizer, train_tokenizer
from tfgpt.training import TrainConfig, TrainConfigError, WarmupCosine, fit_plan, train

REPO = REPO_ROOT


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tinystories_dir) -> dict[str, Path]:
    """A slice of the shared TinyStories text (120 train / 40 validation stories, written to a temp dir,
    never into the repo) and a 512-piece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    data = root / "data"
    data.mkdir()
    train_stories = []
    for story in load_stories(str(tinystories_dir / "TinyStories-train.head-2MiB.txt.xz"), "all"):
        train_stories.append(story)
        if len(train_stories) == 120:
            break
    valid_stories = []
    for story in load_stories(str(tinystories_dir / "TinyStories-valid.head.txt.xz"), "all"):
        valid_stories.append(story)
        if len(valid_stories) == 40:
            break
    (data / "train.txt").write_text("".join(f"{s}\n{EOT}\n" for s in train_stories), encoding="utf-8")
    (data / "valid.txt").write_text("".join(f"{s}\n{EOT}\n" for s in valid_stories), encoding="utf-8")
    small = root / "small"  # 40 + 15 stories: 55 steps per epoch at B=8, T=32
    small.mkdir()
    (small / "train.txt").write_text("".join(f"{s}\n{EOT}\n" for s in train_stories[:40]), encoding="utf-8")
    (small / "valid.txt").write_text("".join(f"{s}\n{EOT}\n" for s in valid_stories[:15]), encoding="utf-8")
    train_tokenizer(train_stories, 512, root / "tokenizer")
    return {"root": root, "data": data, "small": small, "tokenizer": root / "tokenizer", "cache": root / "cache"}


def small_config(corpus, tmp_path: Path, **overrides) -> TrainConfig:
    """tiny preset, T=32, B=8: 167 steps per epoch on the slice."""
    values = dict(
        preset="tiny",
        data=str(corpus["data"]),
        tokenizer=str(corpus["tokenizer"]),
        cache_dir=str(corpus["cache"]),
        out=str(tmp_path / "runs"),
        logdir=str(tmp_path / "logs"),
        epochs=2,
        batch_size=8,
        context=32,
        lr=3e-3,
        warmup=10,
        precision="float32",
        xla=False,
        strategy="default",
        sample_tokens=0,
        verbose=0,
        export=False,
        run_name="run",
    )
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(corpus, out: Path, run_name: str, *extra: str, data: str = "data") -> list[str]:
    return [
        "--preset", "tiny", "--data", str(corpus[data]), "--tokenizer", str(corpus["tokenizer"]),
        "--cache-dir", str(corpus["cache"]), "--out", str(out / "runs"), "--logdir", str(out / "logs"),
        "--run-name", run_name, "--batch-size", "8", "--context", "32", "--lr", "3e-3", "--warmup", "10",
        "--precision", "float32", "--no-xla", "--strategy", "default", "--sample-tokens", "0",
        "--verbose", "0", "--no-export", *extra,
    ]  # fmt: skip


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train_keras.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def event_tags(log_dir: Path) -> dict[str, list[tuple[int, object]]]:
    """{tag: [(step, value or text)]} from every event file under log_dir."""
    tags: dict[str, list] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                tags.setdefault(value.tag, []).append((event.step, tensor))
    return tags


# ------------------------------------------------------------------------------------------ fit plan
def test_fit_plan_splits_partial_and_whole_epochs():
    assert fit_plan(0, 10, 30) == [(0, 3, 10, 0)]
    assert fit_plan(0, 10, 25) == [(0, 2, 10, 0), (2, 1, 5, 0)]  # --max-steps ends mid-epoch
    assert fit_plan(13, 10, 30) == [(1, 1, 7, 3), (2, 1, 10, 0)]  # resumed mid-epoch
    assert fit_plan(13, 10, 15) == [(1, 1, 2, 3)]
    assert fit_plan(20, 10, 20) == []
    for start in range(0, 47):
        plan = fit_plan(start, 10, 47)
        assert sum(n * steps for _, n, steps, _ in plan) == 47 - start


# ------------------------------------------------------------------------------------------ a short run
@pytest.fixture(scope="module")
def short_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("short")
    cfg = small_config(corpus, tmp, sample_tokens=8, log_every=20, backup_every=100, export=True)
    summary = train(cfg)
    return cfg, summary


def test_short_run_lowers_validation_loss_and_writes_the_run_directory(short_run):
    cfg, summary = short_run
    run_dir = cfg.run_dir
    assert summary["status"] == "completed" and summary["global_step"] == 2 * 167
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[1]["val_loss"] < epochs[0]["val_loss"] < math.log(512)
    assert epochs[1]["val_perplexity"] == pytest.approx(math.exp(epochs[1]["val_loss"]), rel=1e-6)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["vocab_size"] == 512 and config["model"]["context"] == 32
    assert config["train"]["lr"] == 3e-3 and config["tokenizer_source"] == cfg.tokenizer
    # the run keeps its own copy of the tokenizer, named relative to the run directory, and loads with it
    pinned = Tokenizer.load(run_dir / config["tokenizer"])
    assert config["tokenizer"] == "tokenizer" and pinned.sha256 == config["tokenizer_info"]["sha256"]
    assert pinned.model_proto == Tokenizer.load(cfg.tokenizer).model_proto
    assert config["data"]["train"] == cfg.data and config["schedule"]["total_steps"] == 334
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one): the run names the commit it was trained from
        assert config["source"]["commit"] == head.stdout.strip() and isinstance(config["source"]["dirty"], bool)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["epochs"]) == 2
    for record in metrics["epochs"]:
        assert record["tokens_per_sec"] > 0 and record["wall_time_s"] > 0
        assert record["tokens_seen"] == record["step"] * 8 * 32
    assert metrics["best_val_loss"] == pytest.approx(epochs[1]["val_loss"])

    model = keras.saving.load_model(run_dir / "model.keras")  # the best (epoch 2) model, weights only
    assert model.config.vocab_size == 512 and not model.compiled
    with np.load(run_dir / "backup" / "state.npz") as backup:  # best = last epoch here: the final weights
        for i, v in enumerate(model.weights):
            np.testing.assert_array_equal(v.numpy(), backup[f"model/{i}"], err_msg=v.path)
    assert (run_dir / "saved_model" / "saved_model.pb").is_file()  # export=True: the run exports at the end
    assert summary["saved_model"] == str(run_dir / "saved_model")
    state = read_backup_meta(run_dir / "backup" / "state.npz")["state"]
    assert state["finished"] and state["global_step"] == 334


def test_short_run_tensorboard_events(short_run):
    cfg, summary = short_run
    tags = event_tags(cfg.log_dir)
    for tag in ("train/loss", "train/learning_rate", "train/tokens_per_sec", "epoch/train_loss",
                "epoch/val_loss", "epoch/val_perplexity"):  # fmt: skip
        assert tag in tags, (tag, sorted(tags))
    assert [s for s, _ in tags["train/loss"]] == list(range(20, 335, 20))
    assert [s for s, _ in tags["epoch/val_loss"]] == [167, 334]
    val = [float(v) for _, v in tags["epoch/val_loss"]]
    assert val == pytest.approx([e["val_loss"] for e in summary["epochs"]], rel=1e-6)
    lr_at = dict((s, float(v)) for s, v in tags["train/learning_rate"])
    assert lr_at[20] == pytest.approx(WarmupCosine(3e-3, 10, 334).value(19), rel=1e-6)
    for tag in ("samples/greedy", "samples/temperature_0.8"):
        texts = [t for _, t in tags[tag]]
        assert len(texts) == 2 and all(len(t) == 3 for t in texts)
        assert texts[0][0].decode().startswith("**Once upon a time**")


def test_rerun_of_a_finished_run_and_config_replay(short_run, capsys):
    cfg, summary = short_run
    again = train(cfg)  # the same settings find the same, finished run: nothing is trained
    assert again["global_step"] == summary["global_step"] and "already complete" in capsys.readouterr().out
    # --config replays the run's settings: the same run, already complete, exit status 0.
    assert train_keras.main(["--config", str(cfg.run_dir / "config.json"), "--verbose", "0"]) == 0
    assert "already complete" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ resume
def test_sigkill_then_rerun_resumes_exactly(corpus, tmp_path):
    """kill -9 after the first backup, rerun the same command: it resumes at the saved step and ends with
    the weights of an uninterrupted run (same seed), across the epoch boundary and with dropout."""
    # 55 steps per epoch: the killed run is resumed in epoch 1 and goes on into epoch 2.
    extra = ["--epochs", "2", "--max-steps", "80", "--backup-every", "10", "--dropout", "0.1", "--val-steps", "2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = cli_args(corpus, tmp_path, "killed", *extra, data="small")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_keras.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    backup = tmp_path / "runs" / "killed" / "backup" / "state.npz"
    deadline = time.monotonic() + 180
    while not backup.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    saved_step = read_backup_meta(backup)["state"]["global_step"]
    assert 0 < saved_step < 55 and saved_step % 10 == 0

    ref = run_cli(cli_args(corpus, tmp_path, "reference", *extra, data="small"))  # never interrupted
    assert ref.returncode == 0, ref.stderr[-2000:]

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {saved_step} " in resumed.stdout

    with np.load(tmp_path / "runs" / "reference" / "backup" / "state.npz") as a, np.load(backup) as b:
        keys = [k for k in a.files if k != "meta"]
        assert keys == [k for k in b.files if k != "meta"]
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
        state_a = json.loads(bytes(a["meta"]).decode())["state"]
        state_b = json.loads(bytes(b["meta"]).decode())["state"]
    assert state_b["global_step"] == state_a["global_step"] == 80 and len(state_b["history"]) == 2
    for ra, rb in zip(state_a["history"], state_b["history"], strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-6)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], abs=1e-6)


def test_time_budget_stops_finishes_and_rerun_continues(corpus, tmp_path):
    cfg = small_config(corpus, tmp_path, epochs=1, max_steps=15, val_steps=2, time_budget=1e-3)
    first = train(cfg)
    assert first["status"] == "time_budget" and first["global_step"] == 1
    assert (cfg.run_dir / "metrics.json").is_file() and (cfg.run_dir / "model.keras").is_file()
    assert not read_backup_meta(cfg.run_dir / "backup" / "state.npz")["state"]["finished"]
    with pytest.raises(TrainConfigError, match="different settings.*lr"):  # not the same run: refused
        train(dataclass_replace(cfg, lr=1e-2, time_budget=None))

    second = train(dataclass_replace(cfg, time_budget=None))  # a run-control setting: same run
    assert second["status"] == "completed" and second["resumed_from_step"] == 1
    assert second["global_step"] == 15


def dataclass_replace(cfg: TrainConfig, **changes) -> TrainConfig:
    return TrainConfig(**{**cfg.to_dict(), **changes})


# ------------------------------------------------------------------------------------------ devices
def test_mirrored_over_two_logical_cpus_matches_default(corpus, tmp_path):
    script = textwrap.dedent(f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from tfgpt.training import TrainConfig, train
        out = {{}}
        for strategy in ("mirrored", "default"):
            cfg = TrainConfig(preset="tiny", data={str(corpus["data"])!r}, tokenizer={str(corpus["tokenizer"])!r},
                              cache_dir={str(corpus["cache"])!r}, out={str(tmp_path / "runs")!r},
                              logdir={str(tmp_path / "logs")!r}, run_name=strategy, epochs=1, max_steps=20,
                              batch_size=8, context=32, lr=3e-3, warmup=10, precision="float32",
                              xla=strategy == "mirrored",  # asked for, and refused, on mirrored CPUs
                              strategy=strategy, sample_tokens=0, verbose=0, export=False, val_steps=2)
            out[strategy] = train(cfg)
        print("RESULT " + json.dumps({{k: [v["replicas"], v["xla"], v["final_train_loss"], v["final_val_loss"]]
                                       for k, v in out.items()}}))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "notice: XLA is off: MirroredStrategy over CPU devices" in proc.stdout
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    (m_replicas, m_xla, m_train, m_val), (d_replicas, d_xla, d_train, d_val) = result["mirrored"], result["default"]
    assert (m_replicas, m_xla, d_replicas, d_xla) == (2, False, 1, False)
    # Same global batch, same all-reduced + globally clipped update: the same losses.
    assert m_train == pytest.approx(d_train, abs=2e-4) and m_val == pytest.approx(d_val, abs=2e-4)
    # ... and the same weights (Adam hides a constant gradient factor: test_training_strategy.py checks the
    # update itself with SGD).
    with np.load(tmp_path / "runs" / "mirrored" / "backup" / "state.npz") as m, \
            np.load(tmp_path / "runs" / "default" / "backup" / "state.npz") as d:
        for k in (k for k in d.files if k.startswith("model/")):
            np.testing.assert_allclose(m[k], d[k], rtol=0, atol=1e-4, err_msg=k)


def test_mixed_bfloat16_trains_with_float32_variables(corpus, tmp_path):
    seen = {}

    class Inspect(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            seen["variable_dtypes"] = {v.dtype for v in self.model.trainable_variables}
            seen["compute_dtype"] = self.model.compute_dtype

    cfg = small_config(corpus, tmp_path, precision="mixed_bfloat16", epochs=1, max_steps=30, val_steps=2)
    summary = train(cfg, extra_callbacks=[Inspect()])
    assert summary["precision"] == "mixed_bfloat16"
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_val_loss"])
    assert summary["final_val_loss"] < math.log(512)
    assert seen == {"variable_dtypes": {"float32"}, "compute_dtype": "bfloat16"}
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run


def test_mixed_float16_training_follows_float32(corpus, tmp_path):
    """The float16 path as `train` builds it (LossScaleOptimizer over AdamW with clipping): the same steps
    move the weights as float32 does, up to float16 rounding; no step is lost to the loss scale."""
    seen: dict[str, dict] = {}

    class Weights(keras.callbacks.Callback):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def on_train_begin(self, logs=None):
            seen[self.key] = {"start": [w.copy() for w in self.model.get_weights()]}

        def on_train_end(self, logs=None):
            seen[self.key]["end"] = [w.copy() for w in self.model.get_weights()]
            seen[self.key]["optimizer"] = type(self.model.optimizer).__name__
            seen[self.key]["iterations"] = int(self.model.optimizer.iterations.numpy())

    for precision in ("float32", "mixed_float16"):
        cfg = small_config(corpus, tmp_path / precision, precision=precision, epochs=1, max_steps=20, val_steps=2,
                           dropout=0.0)
        summary = train(cfg, extra_callbacks=[Weights(precision)])
        assert summary["precision"] == precision and math.isfinite(summary["final_val_loss"])
    f32, f16 = seen["float32"], seen["mixed_float16"]
    assert f16["optimizer"] == "LossScaleOptimizer" and f32["optimizer"] == "AdamW"
    assert f16["iterations"] == f32["iterations"] == 20  # no step skipped for an overflow
    for a, b in zip(f32["start"], f16["start"], strict=True):
        np.testing.assert_array_equal(a, b)  # the same initial weights
    u32 = np.concatenate([(e - s).ravel() for s, e in zip(f32["start"], f32["end"], strict=True)])
    u16 = np.concatenate([(e - s).ravel() for s, e in zip(f16["start"], f16["end"], strict=True)])
    cos = float(u16 @ u32 / (np.linalg.norm(u16) * np.linalg.norm(u32)))
    assert cos > 0.9 and 0.8 < np.linalg.norm(u16) / np.linalg.norm(u32) < 1.25, (cos, np.linalg.norm(u16),
                                                                                  np.linalg.norm(u32))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["--preset", "tiny", "--context", "128"], "--context 128 is larger than preset 'tiny' allows (64"),
        (["--data", "/nonexistent/stories.txt"], "--data path /nonexistent/stories.txt does not exist"),
        (["--tokenizer", "/nonexistent/tok"], "no tokenizer at /nonexistent/tok"),
        (["--time-budget", "soon"], "--time-budget: expected a duration"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(args, expected, corpus):
    if "--tokenizer" not in args:
        args = [*args, "--tokenizer", str(corpus["tokenizer"])]
    start = time.monotonic()
    proc = run_cli(args, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr
    assert time.monotonic() - start < 10  # validated before TensorFlow is imported


def test_resume_with_a_different_flag_is_one_error_line(short_run):
    cfg, _ = short_run
    proc = run_cli(["--resume", str(cfg.run_dir), "--lr", "0.5"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: --resume") and "--lr 0.5 (the run has 0.003)" in proc.stderr


def test_warmup_not_shorter_than_training_is_refused(corpus, tmp_path):
    with pytest.raises(TrainConfigError, match="--warmup 50 is not smaller than the 20 training steps"):
        train(small_config(corpus, tmp_path, max_steps=20, warmup=50))


def test_a_quick_run_adapts_the_default_warmup(corpus, tmp_path, capsys):
    """`--max-steps 40` without --warmup: the default warm-up (100 steps) becomes 10 % of the run."""
    args = cli_args(corpus, tmp_path, "quick", "--max-steps", "40", "--val-steps", "1", data="small")
    args = [a for a in args if a not in ("--warmup", "10")]
    assert "--warmup" not in args
    assert train_keras.main(args) == 0
    out = capsys.readouterr().out
    assert "notice: warm-up 4 steps (10 % of this 40-step run" in out and "completed: step 40/40" in out
    config = json.loads((tmp_path / "runs" / "quick" / "config.json").read_text())
    assert config["train"]["warmup"] is None and config["schedule"]["warmup"] == 4


def test_without_data_and_without_the_hub_one_error_line_names_the_bundled_sample(corpus, tmp_path):
    """The default --data is the Hugging Face id; offline (as this sandbox is) it fails with one line."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the script quiets TensorFlow
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = ["--preset", "tiny", "--tokenizer", str(corpus["tokenizer"]), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "runs"), "--logdir", str(tmp_path / "logs"), "--max-steps", "2"]
    proc = subprocess.run([sys.executable, str(REPO / "train_keras.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line: no traceback, no TensorFlow start-up noise
    assert proc.stderr.startswith("error: no --data given, and the Hugging Face dataset roneneldan/TinyStories "
                                  "cannot be loaded")
    assert "--data data/tinystories" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_json_records_hold_no_absolute_path_of_the_repository(corpus, tmp_path):
    """Paths inside the repository are recorded relative to it, whichever way they were given."""
    cfg = small_config(corpus, tmp_path, tokenizer=str(REPO_ROOT / "tokenizer"), max_steps=2, epochs=1, warmup=1,
                       val_steps=1, data=str(corpus["small"]))
    train(cfg)
    for name in ("config.json", "metrics.json"):
        text = (cfg.run_dir / name).read_text()
        assert str(REPO_ROOT) not in text, name
    config = json.loads((cfg.run_dir / "config.json").read_text())
    assert config["tokenizer"] == "tokenizer" and config["train"]["tokenizer"] == "tokenizer"


def test_dev_split_run_validates_on_dev_stories_only(corpus, tmp_path):
    from tfgpt.data import token_stream

    cfg = small_config(corpus, tmp_path, dev_fraction=0.2, epochs=1, max_steps=10, warmup=2)
    summary = train(cfg)
    config = json.loads((cfg.run_dir / "config.json").read_text())
    kw = {"cache_dir": cfg.cache_dir, "progress": False}
    tok = Tokenizer.load(cfg.tokenizer)
    train_part = token_stream(cfg.data, tok, "train", dev_fraction=0.2, **kw)
    dev_part = token_stream(cfg.data, tok, "dev", dev_fraction=0.2, **kw)
    whole = token_stream(cfg.data, tok, "train", **kw)
    assert config["data"]["train_tokens"] == len(train_part) and config["data"]["val_tokens"] == len(dev_part)
    assert len(train_part) + len(dev_part) == len(whole) + 1
    assert "dev split" in config["data"]["validation"] and config["train"]["dev_fraction"] == 0.2
    assert summary["status"] == "completed"
    # dev_fraction 0 leaves the identity (and so the default run name) of older runs unchanged
    assert "dev_fraction" not in small_config(corpus, tmp_path).identity()
    with pytest.raises(TrainConfigError, match="--dev-fraction and --val-data"):
        small_config(corpus, tmp_path, dev_fraction=0.1, val_data=str(corpus["data"]))


# ------------------------------------------------------------------------------------------ nothing lost on resume
def paused_run(corpus, tmp_path: Path) -> TrainConfig:
    """A run stopped by its time budget after one step (a backup, not finished), with its own tokenizer copy."""
    tokenizer = tmp_path / "tok"
    shutil.copytree(corpus["tokenizer"], tokenizer)
    cfg = small_config(corpus, tmp_path, tokenizer=str(tokenizer), epochs=1, max_steps=15, val_steps=2,
                       time_budget=1e-3)
    assert train(cfg)["status"] == "time_budget"
    return cfg


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_resume_after_the_tokenizer_was_retrained_is_refused(corpus, tmp_path):
    cfg = paused_run(corpus, tmp_path)
    stories = [s for s in (corpus["data"] / "train.txt").read_text().split(EOT) if s.strip()]
    train_tokenizer(stories[::-1], 480, cfg.tokenizer)  # retrained in place: other ids
    before = files_of(cfg.run_dir)
    proc = run_cli(["--resume", str(cfg.run_dir)], timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: the tokenizer at {cfg.tokenizer} ") and "another --run-name" in proc.stderr
    assert files_of(cfg.run_dir) == before  # the pinned tokenizer and config.json untouched


def test_a_damaged_backup_is_one_error_line(corpus, tmp_path):
    cfg = paused_run(corpus, tmp_path)
    backup = cfg.run_dir / "backup" / "state.npz"
    backup.write_bytes(backup.read_bytes()[: backup.stat().st_size // 2])  # truncated, as by a full disk
    before = files_of(cfg.run_dir)
    proc = run_cli(["--resume", str(cfg.run_dir)], timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: backup {backup} is damaged") and f"delete {backup.parent}" in proc.stderr
    assert files_of(cfg.run_dir) == before


def test_out_naming_a_file_is_one_error_line(corpus, tmp_path):
    afile = tmp_path / "runs.txt"
    afile.write_text("mine")
    proc = run_cli([*cli_args(corpus, tmp_path, "r"), "--out", str(afile)], timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --out {afile} is a file, not a directory") and afile.read_text() == "mine"
