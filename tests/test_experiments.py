"""bench/experiments.py: the power-law fit, the data-scaling group, the table and the plots (synthetic records)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiments():
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "bench" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_power_law_fit_recovers_known_parameters(experiments):
    xs = [0.125, 0.25, 0.5, 1.0, 2.0]
    ys = [0.9 + 0.15 * x**-0.6 for x in xs]
    e, a, alpha = experiments.fit_power_law(xs, ys)
    assert e == pytest.approx(0.9, abs=2e-3) and a == pytest.approx(0.15, abs=2e-3)
    assert alpha == pytest.approx(0.6, abs=5e-3)


def test_power_law_fit_needs_three_distinct_points(experiments):
    with pytest.raises(ValueError, match="three distinct"):
        experiments.fit_power_law([0.5, 1.0, 1.0], [1.0, 0.9, 0.9])


def test_flops_per_token_counts_matrices_embedding_and_attention(experiments):
    model = {"d_model": 256, "n_layers": 6, "context": 256, "vocab_size": 4096, "d_ff": 0}
    matrices = 6 * (4 * 256**2 + 2 * 256 * 1024)
    assert experiments.flops_per_token(model) == 6 * (matrices + 4096 * 256) + 6 * 6 * 256 * 256


def record(name: str, fraction: float, bpb: float, note: str = "") -> dict:
    to_bpb = 1000 / 4000 / math.log(2)
    return {"name": name, "note": note, "parameters": 5.85e6, "tokens": 2_867_200, "steps": 350, "epochs": 0.7,
            "train_minutes": 8.0, "tokens_per_sec": 6000.0, "train": {"train_fraction": fraction},
            "model": {"context": 256},
            "dev_tokens": 1000, "dev_bytes": 4000, "best_step": 350, "best_dev_bpb": bpb, "final_dev_bpb": bpb,
            "evals": [{"epoch": 1, "step": 350, "tokens": 2_867_200, "dev_bpb": bpb}],
            "curve": [[20, 6.0], [340, bpb / to_bpb]]}


def test_table_fit_and_plots_from_records(experiments, tmp_path):
    fracs = {"s6-f12-do1": 0.125, "s6-f25": 0.25, "s6-f50": 0.5, "s6": 1.0}
    records = [record(n, f, 1.0 + 0.1 * f**-0.5, note=f"{f:g} of the text") for n, f in fracs.items()]
    records.append(record("s3", 1.0, 1.2, note="smaller"))
    records[1]["test_bpb"] = 1.15
    big = record("gpt2-small", 1.0, 2.2, note="big")
    records.append({**big, "parameters": 89e6, "model": {"context": 1024}})
    group, fit = experiments.data_scaling(records)
    assert [r["name"] for r in group] == list(fracs) and fit[2] == pytest.approx(0.5, abs=5e-3)
    text = experiments.table(records)
    assert text.count("\n") == 1 + len(records) and "| 1.1500 |" in text
    names = [line.split(" | ")[1] for line in text.splitlines()[2:]]
    assert names == ["s3", "s6", "s6-f12-do1", "s6-f25", "s6-f50", "gpt2-small"]  # in the order of GROUPS
    assert "| data scaling | s6-f25 | 0.25 of the text |" in text
    fit_md = experiments.fit_text(group, fit)
    assert "| 4 (projection) | - | 1.0500 | - |" in fit_md and "| 0.25 | 1.2000 | 1.2000 | 1.1500 |" in fit_md
    doc = f"intro\n{experiments.TABLE_BEGIN}\nold\n{experiments.TABLE_END}\nafter\n"
    assert experiments._replace_between(doc, experiments.TABLE_BEGIN, experiments.TABLE_END, "new") == (
        f"intro\n{experiments.TABLE_BEGIN}\nnew\n{experiments.TABLE_END}\nafter\n")
    written = experiments.plots(records, group, fit, tmp_path)
    assert [p.name for p in written] == ["dev_curves.png", "gpt2_small.png", "data_scaling.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temp file left


def test_fewer_than_three_scaling_runs_give_no_fit(experiments, tmp_path):
    group, fit = experiments.data_scaling([record("s6", 1.0, 1.0), record("s6-f50", 0.5, 1.05)])
    assert fit is None and len(group) == 2
    assert "fewer than three" in experiments.fit_text(group, fit)
    assert [p.name for p in experiments.plots(group, group, fit, tmp_path)] == ["dev_curves.png"]
