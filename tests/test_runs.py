"""tfgpt.runs, the run directory: backups (save, restore, refuse another model), the run state and its
older format, finding the run a command continues, and run files."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model import build_model
from tfgpt.runs import (
    RunError,
    RunState,
    backup_path,
    load_backup,
    read_backup_meta,
    save_backup,
    write_run_file,
)
from tfgpt.training import TrainConfig, TrainConfigError, compile_model, find_run


def tiny_model(seed: int = 0, **overrides):
    """A compiled tiny GPT with its optimizer built, as `train` sets it up."""
    return compile_model(GPTConfig.from_preset("tiny", context=16, **overrides), strategy=tf.distribute.get_strategy(),
                         precision="float32", xla=False, lr=1e-3, seed=seed)


def test_backup_round_trip_restores_model_optimizer_and_state(tmp_path):
    model = tiny_model(seed=1)
    ids = np.random.default_rng(0).integers(0, 512, (2, 17)).astype("int32")
    model.fit(ids[:, :-1], ids[:, 1:], epochs=1, verbose=0)  # optimizer moments and step are non-zero
    state = RunState(global_step=7, epoch=1, step_in_epoch=2, epoch_loss=[12.5, 4.0], history=[{"epoch": 1}])
    path = backup_path(tmp_path / "run")
    save_backup(path, model, state, "abcd1234")
    umask = os.umask(0)
    os.umask(umask)
    assert path == tmp_path / "run" / "backup" / "state.npz" and path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["state.npz"]  # no temporary file left behind
    assert read_backup_meta(path)["identity"] == "abcd1234"

    other = tiny_model(seed=2)
    assert not np.array_equal(other.get_weights()[0], model.get_weights()[0])
    restored = load_backup(path, other)
    assert restored == state
    for a, b in zip(model.variables + model.optimizer.variables, other.variables + other.optimizer.variables,
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_backup_of_another_model_is_refused(tmp_path):
    path = tmp_path / "state.npz"
    save_backup(path, tiny_model(), RunState(), "x")
    with pytest.raises(RunError, match="has shape .* use another --run-name"):
        load_backup(path, tiny_model(d_model=32, n_heads=2))
    with pytest.raises(RunError, match="holds .* model variables, this model has"):
        load_backup(path, tiny_model(n_layers=1))


def test_run_state_reads_format_1_backups():
    old = {"global_step": 3, "step_in_epoch": 3, "loss_tracker": [40.0, 16.0]}  # Keras' (total, count)
    assert RunState.from_dict(old).epoch_loss == [40.0, 16.0]


def test_find_run_new_same_and_different_settings(tmp_path):
    cfg = TrainConfig(preset="tiny", out=str(tmp_path), run_name="r")
    assert find_run(cfg, None) is None
    with pytest.raises(TrainConfigError, match="has no backup to resume from"):
        find_run(cfg, True)
    path = backup_path(cfg.run_dir)
    save_backup(path, tiny_model(), RunState(global_step=4), cfg.identity_hash())
    write_run_file(cfg.run_dir, "config.json", {"train": cfg.to_json()})
    assert find_run(cfg, None) == path and find_run(cfg, True) == path
    with pytest.raises(TrainConfigError, match="already holds a backup; choose another --run-name"):
        find_run(cfg, False)
    changed = TrainConfig(preset="tiny", out=str(tmp_path), run_name="r", lr=5e-3, verbose=0)
    with pytest.raises(TrainConfigError, match=r"different settings \(lr: 0.001 -> 0.005\); rerun with its settings"):
        find_run(changed, None)


def test_write_run_file_creates_the_directory_and_is_readable(tmp_path):
    write_run_file(tmp_path / "new" / "run", "metrics.json", {"status": "running", "path": tmp_path})
    written = tmp_path / "new" / "run" / "metrics.json"
    assert json.loads(written.read_text())["status"] == "running"
    umask = os.umask(0)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_optimizer_variables_are_part_of_the_backup(tmp_path):
    """Built by compile_model, the optimizer's variables (step, moments) are saved and restored before the
    first step, so a backup made at step 0 restores into a fresh model."""
    model = tiny_model()
    assert isinstance(model.optimizer, keras.optimizers.AdamW) and len(model.optimizer.variables) > 2
    for v in model.optimizer.variables:  # distinct values, to see each one land in its own place
        v.assign(np.full(v.shape, hash(v.path) % 97 + 1, v.dtype))
    path = tmp_path / "state.npz"
    save_backup(path, model, RunState(), "x")
    with np.load(path) as z:
        assert sum(k.startswith("optimizer/") for k in z.files) == len(model.optimizer.variables)
    other = tiny_model(seed=3)
    load_backup(path, other)
    for a, b in zip(model.optimizer.variables, other.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_run_decodes_with_the_tokenizer_it_was_trained_with(tmp_path):
    from tfgpt.runs import RunError, load_model, pin_tokenizer
    from tfgpt.tokenizer import Tokenizer, train_tokenizer

    stories = [f"Story {i}: Ana saw {i % 7} green frogs by the pond." for i in range(200)]
    tok_a = train_tokenizer(stories, 320, tmp_path / "tok_a")
    train_tokenizer(stories[::-1][:120] + ["Zed zigzags"] * 50, 310, tmp_path / "tok_b")  # another tokenizer
    run = tmp_path / "run"
    assert pin_tokenizer(run, tok_a) == "tokenizer"
    assert Tokenizer.load(run / "tokenizer").sha256 == tok_a.sha256 and (run / "tokenizer" / "meta.json").is_file()
    model = build_model(GPTConfig.from_preset("tiny", vocab_size=320))
    model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"tokenizer": "tokenizer",
                                                 "tokenizer_info": {"sha256": tok_a.sha256}}))
    _, loaded = load_model(run)
    assert loaded.sha256 == tok_a.sha256
    with pytest.raises(RunError, match=f"is not the one {run} was trained with .* pass --tokenizer {run}/tokenizer"):
        load_model(run, tmp_path / "tok_b")


def test_atomic_write_syncs_file_and_directory_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    from tfgpt import common

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(common.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or
                        real_fsync(fd))
    target = tmp_path / "out.json"
    common.atomic_write(target, b"first")
    assert target.read_bytes() == b"first" and len(synced) == 2
    assert synced[0].startswith(str(tmp_path / ".out.json.")) and synced[1] == str(tmp_path)  # file, then dir
    with pytest.raises(RuntimeError, match="disk gone"), common.atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_source_revision_names_the_checkout_commit_and_nothing_outside_git(tmp_path):
    import subprocess

    from tfgpt.common import source_revision

    assert source_revision(tmp_path) is None  # not a git checkout: no commit is claimed
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("a")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert source_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("b")
    assert source_revision(tmp_path) == {"commit": head, "dirty": True}
