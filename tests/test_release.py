"""`python -m tfgpt.release`: a run's model.keras and SavedModel with float16 weights are the same model at half
the size (the weights rounded to float16, computed in float32)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import tensorflow as tf
from test_export import IDS, LOADER, PROMPTS
from test_generation import tiny_run

from tfgpt import GPTConfig, build_model
from tfgpt.export import ExportError, export_saved_model
from tfgpt.generation import generate_text
from tfgpt.release import KERAS_WEIGHTS, ReleaseError, store_weights_as
from tfgpt.release import main as release_main
from tfgpt.runs import load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tinystories_dir):
    return tiny_run(tmp_path_factory.getbasetemp(), tinystories_dir)


def stored_dtypes(model_file) -> dict[str, set[str]]:
    """The dtypes of the floating-point arrays inside a .keras file: {"weights": ..., "optimizer": ...}."""
    found = {"weights": set(), "optimizer": set()}
    with zipfile.ZipFile(model_file) as archive, h5py.File(archive.open(KERAS_WEIGHTS), "r") as stored:
        stored.visititems(lambda name, item: found["optimizer" if name.startswith("optimizer/") else "weights"]
                          .add(str(item.dtype)) if isinstance(item, h5py.Dataset) and item.dtype.kind == "f" else None)
    return found


def test_release_stores_half_precision_weights_of_the_same_model(trained, tmp_path, capsys):
    source, model, tokenizer = trained
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = (run / "model.keras").stat().st_size
    assert stored_dtypes(run / "model.keras") == {"weights": {"float32"}, "optimizer": {"float32"}}
    assert release_main([str(run)]) == 0
    assert "stored as float16" in capsys.readouterr().out

    # model.keras: float16 weights inside (Adam's state stays float32), float32 variables on load holding
    # exactly the rounded weights.
    assert stored_dtypes(run / "model.keras") == {"weights": {"float16"}, "optimizer": {"float32"}}
    weights_bytes = 4 * model.count_params()
    assert before - (run / "model.keras").stat().st_size > 0.45 * weights_bytes
    released, _ = load_model(run)
    for old, new in zip(model.weights, released.weights, strict=True):
        assert new.dtype == old.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old).astype(np.float16).astype(np.float32))
    logits = np.asarray(released(np.array(IDS, np.int32)))
    assert 0 < np.abs(logits - np.asarray(model(np.array(IDS, np.int32)))).max() < 0.05  # rounded, not redrawn

    # saved_model/: float16 variables; plain TF computes what the released Keras model computes.
    reader = tf.train.load_checkpoint(str(run / "saved_model" / "variables" / "variables"))
    floats = {str(d.name) for n, d in reader.get_variable_to_dtype_map().items()
              if n.endswith("VARIABLE_VALUE") and d.is_floating}
    assert floats == {"float16"}
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "load.py", str(run / "saved_model"), json.dumps(PROMPTS), json.dumps(IDS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(result["logits"]), logits, atol=1e-5)
    assert result["greedy"] == generate_text(released, tokenizer, PROMPTS, 30, temperature=0.0)

    config = json.loads((run / "config.json").read_text())
    assert config["release"]["weights_dtype"] == "float16"
    assert config["model"] == json.loads((source / "config.json").read_text())["model"]

    # A second release changes nothing in model.keras (the weights already are float16).
    data = (run / "model.keras").read_bytes()
    assert store_weights_as(run / "model.keras") == 0
    assert (run / "model.keras").read_bytes() == data


def test_a_weight_float16_cannot_hold_is_refused_and_the_file_kept(tmp_path):
    model = build_model(GPTConfig.from_preset("tiny", vocab_size=64))
    model.weights[0].assign(np.full(model.weights[0].shape, 7e4, np.float32))  # beyond float16's 65504
    big = tmp_path / "big.keras"
    model.save(big)
    data = big.read_bytes()
    with pytest.raises(ReleaseError, match="exceeds the float16 range"):
        store_weights_as(big)
    assert big.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["big.keras"]  # no temp file left


def test_release_errors_are_one_line(tmp_path, capsys):
    not_zip = tmp_path / "model.keras"
    not_zip.write_text("not a model")
    with pytest.raises(ReleaseError, match="is not a .keras archive"):
        store_weights_as(not_zip)
    assert release_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'missing'} is not a trained run")


def test_export_refuses_an_unknown_weights_dtype_or_a_weight_float16_cannot_hold(trained, tmp_path):
    _, model, tokenizer = trained
    with pytest.raises(ExportError, match="unknown weights dtype 'int8'; use one of float32, float16"):
        export_saved_model(model, tokenizer, tmp_path / "out", weights_dtype="int8")
    big = build_model(GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
    big.weights[0].assign(np.full(big.weights[0].shape, -7e4, np.float32))
    with pytest.raises(ExportError, match=f"weight {big.weights[0].path} exceeds the float16 range"):
        export_saved_model(big, tokenizer, tmp_path / "out", weights_dtype="float16")
    assert not (tmp_path / "out").exists()
