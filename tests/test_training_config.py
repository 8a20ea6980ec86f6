"""tfgpt.training.config: TrainConfig checks, the warm-up default of short runs, how flags, --config and
--resume combine, and repository-relative paths in what is recorded. No TensorFlow needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tfgpt.common import REPO_ROOT
from tfgpt.training.config import (
    DEFAULT_WARMUP,
    TrainConfig,
    TrainConfigError,
    config_differences,
    settings_from_flags,
)

TOKENIZER = str(REPO_ROOT / "tokenizer")


def test_importing_the_config_and_the_package_does_not_import_tensorflow():
    code = "import sys, tfgpt.training, tfgpt.training.config, train_keras; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "--epochs must be an integer >= 1, got 0"),
        ({"warmup": -1}, "--warmup must be an integer >= 0"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"preset": "tiny", "context": 128}, "--context 128 is larger than preset 'tiny' allows (64"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"beta2": 1.0}, "--beta2 must be in [0, 1), got 1.0"),
        ({"min_lr_ratio": 1.5}, "--min-lr-ratio must be in [0, 1], got 1.5"),
        ({"precision": "fp8"}, "--precision must be one of auto, float32"),
        ({"run_name": "a/b"}, "--run-name must be a plain directory name"),
        ({"n_layers": 0}, "--n-layers must be an integer >= 1, got 0"),
        ({"preset": "tiny", "d_model": 60, "n_heads": 8}, "model settings: d_model (60) must be divisible by n_heads"),
        ({"norm_position": "middle"}, "model settings: norm_position must be one of ('pre', 'post')"),
        ({"train_fraction": 0.0}, "--train-fraction must be in (0, 1], got 0.0"),
        ({"train_fraction": 1.5}, "--train-fraction must be in (0, 1], got 1.5"),
    ],
)
def test_bad_settings_name_the_flag(overrides, message):
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(**overrides)
    assert message in str(err.value)


def test_default_warmup_adapts_to_a_short_run_and_an_explicit_one_must_fit():
    assert TrainConfig().warmup_steps(10 * DEFAULT_WARMUP) == (DEFAULT_WARMUP, None)
    warmup, notice = TrainConfig().warmup_steps(40)
    assert warmup == 4 and notice.startswith("notice: warm-up 4 steps (10 % of this 40-step run")
    assert "\n" not in notice
    assert TrainConfig(warmup=30).warmup_steps(40) == (30, None)
    with pytest.raises(TrainConfigError, match="--warmup 40 is not smaller than the 40 training steps"):
        TrainConfig(warmup=40).warmup_steps(40)


def test_identity_ignores_run_control_settings_and_names_differences():
    a = TrainConfig(preset="tiny", lr=1e-3)
    b = TrainConfig(preset="tiny", lr=1e-3, out="elsewhere", time_budget=5.0, verbose=0)
    assert a.identity_hash() == b.identity_hash() and a.resolved_run_name == f"tiny-{a.identity_hash()}"
    c = TrainConfig(preset="tiny", lr=2e-3)
    assert config_differences(a.to_json(), c) == ["lr: 0.001 -> 0.002"]


def test_model_overrides_change_the_preset_and_leave_old_run_identities_alone():
    base = TrainConfig(preset="bench-6m")
    cfg = TrainConfig(preset="bench-6m", d_model=384, n_heads=6, n_layers=4, norm_position="post",
                      position_encoding="sinusoidal", dropout=0.2)
    mc = cfg.model_config(4096)
    assert (mc.d_model, mc.n_heads, mc.n_layers, mc.d_ff, mc.norm_position, mc.position_encoding, mc.dropout,
            mc.vocab_size, mc.context) == (384, 6, 4, 4 * 384, "post", "sinusoidal", 0.2, 4096, 256)
    assert base.model_config(4096) == TrainConfig(preset="bench-6m").model_config(4096)
    assert base.model_config(4096).d_model == 256
    # Settings left at "as before" are not part of the identity, so runs recorded earlier keep their names ...
    identity = base.identity()
    assert not {"d_model", "n_layers", "n_heads", "norm_position", "position_encoding", "train_fraction"} & set(identity)
    old = {k: v for k, v in base.to_json().items()
           if k not in ("d_model", "n_layers", "n_heads", "norm_position", "position_encoding", "train_fraction")}
    assert config_differences(old, base) == []
    # ... and each override is a different run, named in the differences.
    assert config_differences(base.to_json(), TrainConfig(preset="bench-6m", train_fraction=0.25)) == [
        "train_fraction: None -> 0.25"]
    assert TrainConfig(preset="bench-6m", d_model=384, n_heads=8).identity_hash() != base.identity_hash()


def test_paths_are_recorded_relative_to_the_repository():
    cfg = TrainConfig(data=str(REPO_ROOT / "data" / "tinystories"), tokenizer=TOKENIZER, out="/tmp/elsewhere")
    recorded = cfg.to_json()
    assert recorded["data"] == "data/tinystories" and recorded["tokenizer"] == "tokenizer"
    assert recorded["out"] == "/tmp/elsewhere"  # outside the repository: as given
    # The same data spelt absolute or relative is the same run.
    assert TrainConfig(data="data/tinystories").identity_hash() == TrainConfig(
        data=str(REPO_ROOT / "data" / "tinystories")).identity_hash()


def saved_run(tmp_path: Path, **train) -> Path:
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    values = TrainConfig(preset="tiny", tokenizer=TOKENIZER, lr=3e-3, **train).to_json()
    (run_dir / "config.json").write_text(json.dumps({"train": values}))
    return run_dir


def test_config_replay_and_flags_override_it(tmp_path):
    run_dir = saved_run(tmp_path, epochs=3)
    cfg, resume = settings_from_flags({"epochs": 7}, config=str(run_dir / "config.json"))
    assert (cfg.preset, cfg.lr, cfg.epochs, resume) == ("tiny", 3e-3, 7, None)


def test_resume_takes_the_run_settings_and_refuses_contradicting_flags(tmp_path):
    run_dir = saved_run(tmp_path)
    cfg, resume = settings_from_flags({"out": str(tmp_path / "runs"), "verbose": 0}, resume="old")
    assert resume is True and cfg.run_dir == run_dir and cfg.lr == 3e-3 and cfg.verbose == 0
    cfg, _ = settings_from_flags({}, resume=str(run_dir))  # or the run directory itself
    assert cfg.run_dir == run_dir
    with pytest.raises(TrainConfigError, match=r"--resume old: --lr 0.5 \(the run has 0.003\)"):
        settings_from_flags({"out": str(tmp_path / "runs"), "lr": 0.5}, resume="old")
    with pytest.raises(TrainConfigError, match="--resume nothing: no run at"):
        settings_from_flags({"out": str(tmp_path / "runs")}, resume="nothing")


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"tokenizer": "/nonexistent/tok"}, "no tokenizer at /nonexistent/tok"),
        ({"data": "/nonexistent/stories.txt"}, "--data path /nonexistent/stories.txt does not exist"),
        ({"val_data": "./missing"}, "--val-data path ./missing does not exist"),
    ],
)
def test_missing_paths_are_refused_before_training(flags, message):
    with pytest.raises(TrainConfigError, match=message):
        settings_from_flags({"tokenizer": TOKENIZER, **flags})


def test_config_file_that_is_not_a_run_config(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2]")
    with pytest.raises(TrainConfigError, match="is not a tfgpt run config"):
        settings_from_flags({}, config=str(bad))
    with pytest.raises(TrainConfigError, match="does not exist"):
        settings_from_flags({}, config=str(tmp_path / "none.json"))
