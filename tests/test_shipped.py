"""The model that ships in runs/shipped: its files load, agree with what the run recorded, generate, and
reproduce their own evaluation and sample sheet."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "runs" / "shipped"


def _json(name: str) -> dict:
    return json.loads((SHIPPED / name).read_text())


@pytest.fixture(scope="module")
def shipped():
    from tfgpt.runs import load_model

    return load_model(SHIPPED)


def test_the_shipped_files_are_all_there_with_no_optimizer_state():
    for name in ("model.keras", "config.json", "metrics.json", "eval.json", "samples.md", "samples.json",
                 "saved_model/saved_model.pb", "tokenizer/tokenizer.model"):
        assert (SHIPPED / name).is_file(), f"runs/shipped/{name} is missing"
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    # Two float16 copies of the weights (model.keras, saved_model/: `python -m tfgpt.release`) and small files;
    # no optimizer state. 12.3 M parameters: 49 MiB in all, under the ~60 MB the release allows.
    config = _json("config.json")
    assert config["release"]["weights_dtype"] == "float16"
    weights = 2 * config["resolved"]["parameters"]
    assert total < 2 * weights + 4 * 2**20, f"runs/shipped holds {total / 2**20:.1f} MiB: more than its weights"
    assert total < 60e6
    assert not (SHIPPED / "backup").exists(), "the shipped run must not carry its resumable backup"


def test_the_shipped_model_matches_its_config_and_pinned_tokenizer(shipped):
    model, tokenizer = shipped
    config = _json("config.json")
    assert tokenizer.path.parent == SHIPPED / "tokenizer"
    assert tokenizer.sha256 == config["tokenizer_info"]["sha256"]
    assert tokenizer.sha256 == hashlib.sha256((SHIPPED / "tokenizer" / "tokenizer.model").read_bytes()).hexdigest()
    assert model.count_params() == config["resolved"]["parameters"]
    recorded = {k: v for k, v in config["model"].items() if k in model.config.to_dict()}
    assert {k: model.config.to_dict()[k] for k in recorded} == recorded
    metrics = _json("metrics.json")
    assert metrics["status"] == "completed" and metrics["global_step"] == metrics["total_steps"]
    assert metrics["best_val_loss"] == min(e["val_loss"] for e in metrics["epochs"])


def test_the_shipped_model_writes_a_story(shipped):
    from tfgpt.generation import generate_text

    model, tokenizer = shipped
    (story,) = generate_text(model, tokenizer, ["Once upon a time"], 40, temperature=0.0, jit_compile=False)
    words = story.split()
    assert len(words) >= 15 and story.startswith((",", " ")), story
    assert len(set(words)) >= 10, f"greedy text collapsed into repetition: {story!r}"


def test_the_sample_sheet_is_reproduced_by_the_recorded_settings(shipped):
    from tfgpt.generation import generate_text
    from tfgpt.samples import PROMPTS, SETTINGS, to_markdown

    model, tokenizer = shipped
    sheet = _json("samples.json")
    records = sheet["samples"]
    assert len(records) == len(PROMPTS) * len(SETTINGS) == 20
    assert {r["prompt"] for r in records} == set(PROMPTS)
    assert (SHIPPED / "samples.md").read_text() == to_markdown(records, sheet["model"], sheet["command"])
    # One greedy and one sampled story, regenerated alone (seed = the row's own seed), equal the sheet.
    for record in (records[0], records[5]):
        (text,) = generate_text(model, tokenizer, [record["prompt"]], record["max_new_tokens"],
                                temperature=record["temperature"], top_k=record["top_k"], top_p=record["top_p"],
                                seed=record["seed"])
        assert text == record["text"], f"sample {record['id']} is not reproduced"


def test_evaluate_py_reproduces_the_shipped_eval_json(tmp_path):
    recorded = _json("eval.json")
    out = tmp_path / "eval.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "evaluate.py", "--samples", "0", "--no-progress", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(out.read_text())
    assert (fresh["stories"], fresh["tokens"], fresh["bytes"]) == (
        recorded["stories"], recorded["tokens"], recorded["bytes"])
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert fresh[key] == pytest.approx(recorded[key], rel=0.01), key


SAVED_MODEL_LOADER = """
import json, sys
import tensorflow as tf, tensorflow_text  # noqa: F401
m = tf.saved_model.load(sys.argv[1])
out = m.signatures["generate"](prompts=tf.constant(["Once upon a time"]), max_new_tokens=tf.constant(30),
                               temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                               seed=tf.constant(0, tf.int64))
print(json.dumps(out["completions"].numpy()[0].decode("utf-8")))
"""


def test_the_shipped_saved_model_greedy_text_equals_the_keras_model(shipped, tmp_path):
    from tfgpt.generation import generate_text

    model, tokenizer = shipped
    (script := tmp_path / "load.py").write_text(SAVED_MODEL_LOADER)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(script), str(SHIPPED / "saved_model")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (expected,) = generate_text(model, tokenizer, ["Once upon a time"], 30, temperature=0.0, jit_compile=False)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
