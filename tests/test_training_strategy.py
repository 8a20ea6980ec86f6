"""tfgpt.training.strategy under several replicas: MirroredStrategy over two logical CPUs and a real
two-process MultiWorkerMirroredStrategy on 127.0.0.1 take the one-device steps on the same global batch.

The update is checked with plain SGD, where a constant factor on the gradient shows (Adam and clipping
hide one): summing instead of averaging the replicas' gradients doubles it, clipping each replica's share
on its own changes it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tfgpt.common import EOT, REPO_ROOT
from tfgpt.data import load_stories
from tfgpt.runs import backup_path, read_backup_meta

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}

MIRRORED_SGD = """
import sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from tfgpt.config import GPTConfig
from tfgpt.training import WholeGradientMixin, compile_model, resolve_strategy

class SGD(WholeGradientMixin, keras.optimizers.SGD):
    pass

config = GPTConfig.from_preset("tiny", context=16, vocab_size=128)
batches = np.random.default_rng(0).integers(0, 128, (3, 8, 17)).astype("int32")  # 3 steps, global B=8
dataset = tf.data.Dataset.from_tensor_slices((batches[..., :-1], batches[..., 1:]))
out, initial = {}, None
for clip in (1e6, 0.05):  # clipping that never acts (all-reduced, then 1/R each); that always acts
    for name in ("default", "mirrored"):
        strategy = resolve_strategy(name)
        model = compile_model(config, strategy=strategy, precision="float32", xla=False, lr=0.5, seed=3,
                              optimizer=lambda m: SGD(learning_rate=0.5, global_clipnorm=clip))
        initial = model.get_weights() if initial is None else initial
        model.set_weights(initial)
        start = [v.numpy() for v in model.trainable_variables]
        model.fit(dataset, epochs=1, shuffle=False, verbose=0)
        assert strategy.num_replicas_in_sync == (2 if name == "mirrored" else 1)
        for i, (v, s) in enumerate(zip(model.trainable_variables, start)):
            out[f"{name}/{clip}/{i}"] = v.numpy() - s
np.savez(sys.argv[1], **out)
"""


def test_mirrored_sgd_steps_equal_one_device_steps(tmp_path):
    out = tmp_path / "updates.npz"
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SGD, str(out)], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        for clip in ("1000000.0", "0.05"):
            one = [z[k] for k in sorted(z.files, key=lambda k: int(k.rsplit("/", 1)[1])) if k.startswith(f"default/{clip}/")]
            two = [z[k] for k in sorted(z.files, key=lambda k: int(k.rsplit("/", 1)[1])) if k.startswith(f"mirrored/{clip}/")]
            assert len(one) == len(two) > 10
            for i, (a, b) in enumerate(zip(one, two, strict=True)):
                scale = np.abs(a).max()
                assert scale > 0, (clip, i)
                assert np.abs(a - b).max() <= 1e-4 * scale, (clip, i, np.abs(a - b).max(), scale)


# ------------------------------------------------------------------------------------------ multi-worker
def free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stories_dir(root: Path) -> Path:
    """60 training and 20 validation stories of the bundled sample, as text files in `root`."""
    data = REPO_ROOT / "data" / "tinystories"
    root.mkdir()
    for name, source, n in (("train.txt", "TinyStories-train.head-2MiB.txt.xz", 60),
                            ("valid.txt", "TinyStories-valid.head.txt.xz", 20)):  # fmt: skip
        stories = []
        for story in load_stories(str(data / source), "all"):
            stories.append(story)
            if len(stories) == n:
                break
        (root / name).write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    return root


def train_args(data: Path, tmp: Path, out: str, strategy: str) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "train_keras.py"), "--preset", "tiny", "--data", str(data),
        "--tokenizer", str(REPO_ROOT / "tokenizer"), "--cache-dir", str(tmp / "cache"),
        "--out", str(tmp / out / "runs"), "--logdir", str(tmp / out / "logs"), "--run-name", "mw",
        "--batch-size", "8", "--context", "32", "--lr", "3e-3", "--warmup", "2", "--max-steps", "6",
        "--val-steps", "1", "--backup-every", "3", "--precision", "float32", "--no-xla", "--strategy", strategy,
        "--sample-tokens", "0", "--verbose", "0", "--no-export",
    ]  # fmt: skip


def run_two_workers(command_of, timeout: float) -> list[str]:
    """Start `command_of(index)` as workers 0 and 1 of a TF_CONFIG cluster on 127.0.0.1, wait for both (killing
    what is left at `timeout`), assert both exited 0 and return their stdouts."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    workers = []
    try:
        for index in range(2):
            env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
            workers.append(subprocess.Popen(command_of(index), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        outputs = [w.communicate(timeout=max(1.0, deadline - time.monotonic())) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=30)
    for w, (_, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr[-3000:]
    return [out for out, _ in outputs]


MULTIWORKER_SGD = """
import json, os, sys
import numpy as np, tensorflow as tf
from tfgpt.training import resolve_strategy
strategy = resolve_strategy(sys.argv[2])  # first: MultiWorkerMirroredStrategy must come before other ops
import keras
from tfgpt.config import GPTConfig
from tfgpt.training import WholeGradientMixin, compile_model, is_chief

class SGD(WholeGradientMixin, keras.optimizers.SGD):
    pass

config = GPTConfig.from_preset("tiny", context=16, vocab_size=128)
batches = np.random.default_rng(0).integers(0, 128, (3, 8, 17)).astype("int32")  # 3 steps, global B=8
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA  # as tfgpt.data
dataset = tf.data.Dataset.from_tensor_slices((batches[..., :-1], batches[..., 1:])).with_options(options)
out = {}
for clip in (1e6, 0.05):
    model = compile_model(config, strategy=strategy, precision="float32", xla=False, lr=0.5, seed=3,
                          optimizer=lambda m: SGD(learning_rate=0.5, global_clipnorm=clip))
    if os.path.exists(sys.argv[3]):  # the one-device run's initial weights
        with np.load(sys.argv[3]) as z:
            model.set_weights([z[f"w{i}"] for i in range(len(z.files))])
    else:
        np.savez(sys.argv[3], **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    start = [v.numpy() for v in model.trainable_variables]
    model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    for i, (v, s) in enumerate(zip(model.trainable_variables, start)):
        out[f"{clip}/{i}"] = v.numpy() - s
if is_chief(strategy):
    np.savez(sys.argv[1], replicas=strategy.num_replicas_in_sync, **out)
"""


def test_multiworker_sgd_steps_equal_one_device_steps(tmp_path):
    """Plain SGD under a real two-process MultiWorkerMirroredStrategy: each variable's update equals the
    one-device update on the same global batches (a sum instead of a mean doubles it; clipping each worker's
    share on its own changes it)."""
    initial = tmp_path / "initial.npz"  # the one-device run writes its initial weights; the workers load them
    one = subprocess.run([sys.executable, "-c", MULTIWORKER_SGD, str(tmp_path / "one.npz"), "default",
                          str(initial)], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    run_two_workers(lambda index: [sys.executable, "-c", MULTIWORKER_SGD, str(tmp_path / "two.npz"), "multiworker",
                                    str(initial)], timeout=240)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert int(a["replicas"]) == 1 and int(b["replicas"]) == 2
        keys = [k for k in a.files if k != "replicas"]
        assert len(keys) > 20 and sorted(keys) == sorted(k for k in b.files if k != "replicas")
        for k in keys:
            scale = np.abs(a[k]).max()
            assert scale > 0, k
            assert np.abs(a[k] - b[k]).max() <= 1e-4 * scale, (k, np.abs(a[k] - b[k]).max(), scale)


def test_multiworker_two_processes_match_one_process(tmp_path):
    """Two workers (TF_CONFIG, 127.0.0.1) train with the global batch split between them and end with the
    weights of one process; worker 0 writes the run directory and logs, worker 1 writes nothing."""
    data = stories_dir(tmp_path / "data")
    single = subprocess.run(train_args(data, tmp_path, "single", "default"), cwd=REPO_ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)  # fmt: skip (also builds the token cache)
    assert single.returncode == 0, single.stderr[-3000:]

    outputs = run_two_workers(lambda index: train_args(data, tmp_path, f"worker{index}", "multiworker"), timeout=120)
    assert "multiworker strategy x2" in outputs[0] and "XLA off" in outputs[0]

    chief = tmp_path / "worker0" / "runs" / "mw"
    assert {p.name for p in chief.iterdir()} >= {"config.json", "metrics.json", "model.keras", "backup"}
    assert (tmp_path / "worker0" / "logs" / "mw").is_dir()
    assert not (tmp_path / "worker1").exists()  # the other worker wrote no run directory and no logs
    metrics = json.loads((chief / "metrics.json").read_text())
    assert metrics["strategy"] == "multiworker" and metrics["replicas"] == 2 and metrics["global_step"] == 6

    one, two = backup_path(tmp_path / "single" / "runs" / "mw"), backup_path(chief)
    assert read_backup_meta(two)["state"]["global_step"] == read_backup_meta(one)["state"]["global_step"] == 6
    with np.load(one) as a, np.load(two) as b:
        keys = [k for k in a.files if k.startswith("model/")]
        assert keys and keys == [k for k in b.files if k.startswith("model/")]
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-5, err_msg=k)
    assert metrics["final_train_loss"] == pytest.approx(
        json.loads((one.parents[1] / "metrics.json").read_text())["final_train_loss"], abs=1e-5)
