"""tfgpt.training and train_keras.py: schedule, optimizer, loss, a short run and its files, exact resume
after SIGKILL, time budget, mirrored over two logical CPUs, mixed precision, NaN guard, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
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
from tfgpt.config import GPTConfig
from tfgpt.data import load_stories
from tfgpt.model import build_model
from tfgpt.tokenizer import train_tokenizer
from tfgpt.training import (
    RunMonitor,
    RunState,
    StateBackup,
    TrainConfig,
    TrainConfigError,
    WarmupCosine,
    build_optimizer,
    fit_plan,
    next_token_loss,
    no_decay_variables,
    read_backup_meta,
    train,
)

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"


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


# ------------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_matches_formula_and_serialises():
    peak, warmup, total, r = 1e-3, 10, 110, 0.1
    sched = WarmupCosine(peak, warmup, total, r)

    def formula(s):
        if s < warmup:
            return peak * (s + 1) / warmup
        return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup)))))

    for s in (0, 4, 9, 10, 35, 60, 85, 109, 110, 500):
        assert float(sched(s)) == pytest.approx(formula(s), rel=1e-5), s
        assert sched.value(s) == pytest.approx(formula(s), rel=1e-12), s
    assert float(sched(0)) == pytest.approx(peak / warmup, rel=1e-6)  # first update is not wasted
    assert float(sched(warmup - 1)) == pytest.approx(peak, rel=1e-6)  # linear up to the peak
    assert float(sched(60)) == pytest.approx(peak * (r + (1 - r) * 0.5), rel=1e-5)  # half-way: mean
    assert float(sched(total)) == pytest.approx(r * peak, rel=1e-5)  # ends at 10% of the peak
    values = [sched.value(s) for s in range(total + 1)]
    assert all(a < b for a, b in zip(values[: warmup - 1], values[1:warmup], strict=True))
    assert all(a >= b for a, b in zip(values[warmup:-1], values[warmup + 1 :], strict=True))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(restored, WarmupCosine) and restored.get_config() == sched.get_config()


def test_fit_plan_splits_partial_and_whole_epochs():
    assert fit_plan(0, 10, 30) == [(0, 3, 10, 0)]
    assert fit_plan(0, 10, 25) == [(0, 2, 10, 0), (2, 1, 5, 0)]  # --max-steps ends mid-epoch
    assert fit_plan(13, 10, 30) == [(1, 1, 7, 3), (2, 1, 10, 0)]  # resumed mid-epoch
    assert fit_plan(13, 10, 15) == [(1, 1, 2, 3)]
    assert fit_plan(20, 10, 20) == []
    for start in range(0, 47):
        plan = fit_plan(start, 10, 47)
        assert sum(n * steps for _, n, steps, _ in plan) == 47 - start


# ------------------------------------------------------------------------------------------ optimizer
def test_weight_decay_applies_to_matrices_only():
    model = build_model(GPTConfig.from_preset("tiny"))
    exempt = {v.path for v in no_decay_variables(model)}
    decayed = {v.path for v in model.trainable_variables} - exempt
    assert decayed and all(p.endswith("/kernel") for p in decayed)
    assert {p.rsplit("/", 1)[1] for p in exempt} == {"token_embeddings", "position_embeddings", "gamma", "beta", "bias"}

    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(model, lr=lr, weight_decay=wd)
    assert optimizer.beta_2 == 0.95 and optimizer.global_clipnorm == 1.0
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    # Zero gradients: Adam's step is 0, so only the decoupled decay w <- w (1 - lr wd) moves weights.
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for v in model.trainable_variables:
        expected = before[v.path] * (1 - lr * wd) if v.path in decayed else before[v.path]
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-8, err_msg=v.path)


def test_float16_gets_loss_scaling():
    model = build_model(GPTConfig.from_preset("tiny"))
    optimizer = build_optimizer(model, lr=1e-3, loss_scale=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert optimizer.inner_optimizer.weight_decay == pytest.approx(0.1)


def test_next_token_loss_is_mean_cross_entropy_and_masks_ignore_id():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    targets[0, :2] = 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert float(next_token_loss()(targets, logits)) == pytest.approx(nll.mean(), rel=1e-5)
    mask = targets != 0
    assert float(next_token_loss(ignore_id=0)(targets, logits)) == pytest.approx(nll[mask].mean(), rel=1e-5)


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
    assert config["train"]["lr"] == 3e-3 and config["tokenizer"] == cfg.tokenizer
    assert config["data"]["train"] == cfg.data and config["schedule"]["total_steps"] == 334

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
    if importlib.util.find_spec("tfgpt.export") is not None:
        assert (run_dir / "saved_model" / "saved_model.pb").is_file()
        assert summary["saved_model"] == str(run_dir / "saved_model")
    else:
        assert not (run_dir / "saved_model").exists() and summary["saved_model"] is None
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
    try:
        import tfgpt.generation  # noqa: F401
    except ImportError:
        return
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


# ------------------------------------------------------------------------------------------ NaN guard
def test_nan_loss_stops_training_with_a_clear_message_and_no_backup(tmp_path):
    model = build_model(GPTConfig.from_preset("tiny"))
    model.compile(optimizer=build_optimizer(model, lr=1e-3), loss=next_token_loss())
    state = RunState()
    monitor = RunMonitor(state, steps_per_epoch=10, total_steps=100, tokens_per_step=64,
                         schedule=WarmupCosine(1e-3, 5, 100), check_every=1)  # fmt: skip
    backup = StateBackup(tmp_path / "state.npz", state, "x", every=1)
    for cb in (monitor, backup):
        cb.set_model(model)
    model.stop_training = False
    monitor.on_train_batch_end(0, {"loss": float("nan")})
    backup.on_train_batch_end(0, {"loss": float("nan")})
    backup.on_epoch_end(0, {"loss": float("nan")})
    assert model.stop_training and state.status == "diverged"
    assert "became nan by step 1" in monitor.nan_message and "--lr" in monitor.nan_message
    assert not (tmp_path / "state.npz").exists()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--epochs", "0"], "--epochs: must be >= 1"),
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
