"""SavedModel export: loaded in a separate process without tfgpt, it generates what the Python API generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_generation import tiny_run

from tfgpt.export import main as export_main
from tfgpt.generation import generate_text

PROMPTS = ["Once upon a time", "", "Tom and Mia went to the park. Tom saw a big red ball."]
IDS = [[3, 10, 11, 12], [3, 200, 7, 7]]
REPO = Path(__file__).resolve().parents[1]

LOADER = textwrap.dedent(
    """
    import json, sys
    try:
        import tfgpt  # noqa: F401
        project_importable = True
    except ImportError:
        project_importable = False
    import tensorflow as tf, tensorflow_text  # noqa: F401

    m = tf.saved_model.load(sys.argv[1])
    prompts, ids = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    gen = m.signatures["generate"]

    def run(temperature, top_k=0, top_p=1.0, seed=0, max_new=30):
        out = gen(prompts=tf.constant(prompts), max_new_tokens=tf.constant(max_new),
                  temperature=tf.constant(temperature), top_k=tf.constant(top_k), top_p=tf.constant(top_p),
                  seed=tf.constant(seed, tf.int64))
        return [c.decode("utf-8") for c in out["completions"].numpy()], out["num_tokens"].numpy().tolist()

    greedy, greedy_n = run(0.0)
    sampled, _ = run(0.9, top_k=40, top_p=0.95, seed=7)
    try:
        run(1.0, top_p=0.0)
        bad_top_p = "accepted"
    except tf.errors.InvalidArgumentError as exc:
        bad_top_p = exc.message
    logits = m.signatures["serving_default"](token_ids=tf.constant(ids, tf.int32))["logits"].numpy()
    names = [name for name, _ in tf.train.list_variables(sys.argv[1] + "/variables/variables")
             if name.endswith("VARIABLE_VALUE")]
    print(json.dumps({"project_importable": project_importable, "greedy": greedy, "greedy_n": greedy_n,
                      "sampled": sampled, "bad_top_p": bad_top_p, "logits": logits.tolist(),
                      "variables": names}))
    """
)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tinystories_dir):
    return tiny_run(tmp_path_factory.getbasetemp(), tinystories_dir)


def test_saved_model_runs_without_tfgpt_and_matches_python(trained, tmp_path, capsys):
    run, model, tokenizer = trained
    out_dir = tmp_path / "exported"
    assert export_main(["--model", str(run), "--out", str(out_dir)]) == 0  # the CLI, via export_saved_model
    assert f"wrote {out_dir}" in capsys.readouterr().out
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "load.py", str(out_dir), json.dumps(PROMPTS), json.dumps(IDS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["project_importable"] is False

    greedy = generate_text(model, tokenizer, PROMPTS, 30, temperature=0.0)
    assert result["greedy"] == greedy
    assert all(result["greedy_n"]) and all(text for text in result["greedy"])
    # the same loop and seeds: sampled text matches too (the graph path, as the export runs it)
    assert result["sampled"] == generate_text(model, tokenizer, PROMPTS, 30, temperature=0.9, top_k=40,
                                              top_p=0.95, seed=7, jit_compile=False)
    assert "top_p must be in (0, 1]" in result["bad_top_p"]
    np.testing.assert_allclose(np.array(result["logits"]), model(np.array(IDS, np.int32)), atol=1e-5)
    # the model's variables only: no optimizer state
    assert len(result["variables"]) == len(model.variables)
    assert not [name for name in result["variables"] if "optimizer" in name.lower()]


def test_export_cli_error_is_one_line(tmp_path, capsys):
    assert export_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model path {tmp_path / 'missing'} does not exist")


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfgpt.export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})


def test_export_never_replaces_a_folder_that_is_not_a_saved_model(trained, tmp_path):
    run = trained[0]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file")
    afile = tmp_path / "file.txt"
    afile.write_text("not a directory")
    for out, what in [(run, "model.keras"), (folder, "notes.txt"), (afile, "is a file")]:
        before = snapshot(out) if out.is_dir() else out.read_bytes()
        proc = run_export("--model", str(run), "--out", str(out))
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert err[0].startswith(f"error: --out {out} ") and what in err[0]
        assert (snapshot(out) if out.is_dir() else out.read_bytes()) == before


def test_export_replaces_an_old_saved_model(trained, tmp_path):
    out = tmp_path / "exported"
    assert export_main(["--model", str(trained[0]), "--out", str(out)]) == 0
    (out / "variables" / "stale").write_text("left from an old export")
    assert export_main(["--model", str(trained[0]), "--out", str(out)]) == 0
    assert (out / "saved_model.pb").is_file() and not (out / "variables" / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temp or old directory left beside it
