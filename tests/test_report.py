"""report/report.pdf: at most 5 pages before References, built from the committed numbers, whose every table
entry equals the run files (runs/shipped, runs/experiments, bench/RESULTS.md, report/external.json).

Fast: no model is loaded and no figure drawn; Typst compiles the report in about a second.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pypdf
import pytest

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "report"
for path in (REPORT, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import build  # noqa: E402  (report/build.py)

N = json.loads(build.NUMBERS.read_text(encoding="utf-8"))
RUN = REPO / N["run"]["dir"]


def pdf_text(data: bytes | Path) -> list[str]:
    import io

    reader = pypdf.PdfReader(io.BytesIO(data) if isinstance(data, bytes) else data)
    return [page.extract_text() for page in reader.pages]


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def pages() -> list[str]:
    return pdf_text(build.PDF)


@pytest.fixture(scope="module")
def text(pages: list[str]) -> str:
    return flat(" ".join(pages))


def test_at_most_five_pages_before_references(pages: list[str]) -> None:
    import typst

    # report.typ marks the page where the body ends, just before the bibliography
    body_end = json.loads(typst.query(str(build.TYP), "<body-end>", field="value", root=str(REPO),
                                      ignore_system_fonts=True))
    assert body_end == [build.body_pages()] and body_end[0] <= 5, f"the body runs to page {body_end}"
    starts = [i + 1 for i, page in enumerate(pages) if re.search(r"^References\s*$", page, re.M)]
    assert starts == [body_end[0]], f"References heading on pages {starts}, body ends on page {body_end[0]}"


def test_committed_pdf_is_the_compiled_report() -> None:
    """report.pdf is exactly what report.typ makes from the committed numbers.json and figures."""
    import typst

    assert typst.compile(str(build.TYP), root=str(REPO), ignore_system_fonts=True) == build.PDF.read_bytes(), (
        "report/report.pdf is stale: run python report/build.py")


def test_numbers_were_built_from_the_current_run_files() -> None:
    for name, digest in N["inputs"].items():
        path = REPO / name
        assert path.is_file(), f"{name} is gone since the last build: run python report/build.py"
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] == digest, (
            f"{name} changed since the last build: run python report/build.py")
    for name in ("config.json", "metrics.json", "eval.json"):
        assert f"{N['run']['dir']}/{name}" in N["inputs"]
    records = {f"runs/experiments/{p.name}" for p in (REPO / "runs" / "experiments").glob("*.json")}
    assert records <= set(N["inputs"])


def test_test_scores_equal_eval_json(text: str) -> None:
    ev = json.loads((RUN / "eval.json").read_text())
    assert N["test"]["loss"] == f"{ev['loss']:.3f}"
    assert N["test"]["perplexity"] == f"{ev['perplexity']:.2f}"
    assert N["test"]["bpb"] == f"{ev['bits_per_byte']:.3f}"
    assert N["test"]["tokens"] == f"{ev['tokens']:,}" and N["test"]["bytes"] == f"{ev['bytes']:,}"
    assert N["test"]["stories"] == f"{ev['stories']:,}"
    for key in ("distinct_2", "repetition_rate", "eos_rate"):
        assert N["eval_samples"][key + "_s"] == f"{ev['samples'][key]:.3f}"
    row = f"tfgpt, {N['model']['parameters_m']} M (shipped) {N['test']['loss']} {N['test']['perplexity']} {N['test']['bpb']}"
    assert row in text


def test_model_and_training_numbers_equal_config_and_metrics() -> None:
    config = json.loads((RUN / "config.json").read_text())
    metrics = json.loads((RUN / "metrics.json").read_text())
    assert N["model"]["parameters"] == config["resolved"]["parameters"]
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "context"):
        assert N["model"][key] == config["model"][key]
    t = N["train"]
    assert (t["lr"], t["dropout"], t["batch_size"]) == tuple(config["train"][k] for k in ("lr", "dropout", "batch_size"))
    assert t["best_epoch"] == metrics["best_epoch"] and t["best_val_loss"] == f"{metrics['best_val_loss']:.3f}"
    assert t["global_step"] == metrics["global_step"] and t["tokens_seen"] == metrics["tokens_seen"]
    assert [e["val_loss"] for e in t["epochs"]] == [e["val_loss"] for e in metrics["epochs"]]
    for row, e in zip(t["epoch_rows"], metrics["epochs"], strict=True):
        assert (row["train_loss"], row["val_loss"]) == (f"{e['train_loss']:.3f}", f"{e['val_loss']:.3f}")
        assert row["best"] == (e["epoch"] == metrics["best_epoch"])
    if config["data"]["train"] == N["data"]["source"]:  # the run trained on today's data: same token counts
        assert N["data"]["train"]["tokens"] == config["data"]["train_tokens"]
        if t["dev_fraction"]:
            assert N["data"]["dev"]["tokens"] == config["data"]["val_tokens"]


def test_baselines_table(text: str) -> None:
    external = json.loads((REPORT / "external.json").read_text())
    b = N["baselines"]
    assert b["pytorch"]["test_bits_per_byte"] == external["pytorch_reference"]["test_bits_per_byte"]
    for name in ("unigram", "bigram"):
        assert b[name]["bpb_s"] == f"{b[name]['test_bits_per_byte']:.3f}"
        assert f"{b[name]['loss_s']} {b[name]['ppl_s']} {b[name]['bpb_s']}" in text
    assert f"--tokenizer {N['run']['dir']}/tokenizer" in b["command"]  # the run's own tokenizer


def test_experiment_table_rows_equal_the_records(text: str) -> None:
    rows = {r["name"]: r for r in N["experiments"]["rows"]}
    paths = sorted((REPO / "runs" / "experiments").glob("*.json"))
    assert set(rows) == {json.loads(p.read_text())["name"] for p in paths}
    for path in paths:
        r = json.loads(path.read_text())
        row = rows[r["name"]]
        assert row["params"] == f"{r['parameters'] / 1e6:.2f} M" and row["tokens"] == f"{r['tokens'] / 1e6:.2f} M"
        assert row["minutes"] == f"{r['train_minutes']:.1f}" and row["tokens_per_sec"] == f"{r['tokens_per_sec']:,.0f}"
        assert row["dev_bpb"] == f"{r['best_dev_bpb']:.4f}"
        assert row["test_bpb"] == (f"{r['test_bpb']:.4f}" if r.get("test_bpb") is not None else "–")
        assert f"{row['params']} {row['tokens']} {row['minutes']} {row['tokens_per_sec']} {row['dev_bpb']}" in text


def test_speed_table_equals_bench_results(text: str) -> None:
    results = (REPO / "bench" / "RESULTS.md").read_text()
    assert build.bench_speed(REPO / "bench" / "RESULTS.md") == N["speed"]
    for config, v in N["speed"]["train"].items():
        assert re.search(rf"^\| {re.escape(config)}\b.*\| \**{re.escape(v['tokens_per_sec_s'])}\**", results, re.M)
        assert f"{config} {v['tokens_per_sec_s']} {v['vs_torch_s']}" in text
    for row in N["speed"]["decode"]:
        if "no XLA" not in row["engine"]:
            assert f"{row['engine']} {row['batch']} {row['tokens_per_sec_s']}" in text


def test_sample_table_is_computed_from_samples_json(text: str) -> None:
    path = RUN / "samples.json"
    if not path.is_file():
        assert N["draft"], "samples.json is missing but the report is not marked as a draft"
        return
    samples = json.loads(path.read_text())["samples"]
    assert [s["text"] for s in N["samples"]["all"]] == [s["text"] for s in samples]
    for mode, stats in N["samples"]["per_mode"].items():
        texts = [s["text"] for s in samples if s["mode"] == mode]
        assert stats["n"] == len(texts)
        assert stats["distinct_2"] == pytest.approx(build.sample_statistics(texts)["distinct_2"])
    for shown in N["samples"]["shown"]:
        assert flat(shown["text"])[:60] in text


def test_sample_statistics_follow_tfgpt_evaluation() -> None:
    from tfgpt.evaluation import sample_statistics

    texts = ["Tom had a ball. Tom had a ball. Tom had a ball.", "Once upon a time, a cat sat.", "hi"]
    ours, theirs = build.sample_statistics(texts), sample_statistics(texts)
    for key in ("distinct_1", "distinct_2", "repetition_rate", "mean_words"):
        assert ours[key] == pytest.approx(theirs[key])


def test_a_missing_samples_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "shipped"
    run.mkdir()
    for name in ("config.json", "metrics.json", "eval.json"):
        shutil.copy(RUN / name, run / name)
    assert build.main(["--run", str(run), "--no-compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples.json is missing" in err[0] and "tfgpt.samples" in err[0]


def test_attention_recomputation_is_checked_against_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    import attention
    import keras
    import numpy as np

    from tfgpt.config import GPTConfig
    from tfgpt.model import build_model

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    model = build_model(GPTConfig.from_preset("tiny"))
    ids = [3, 17, 42, 7, 99, 5, 11, 64]
    maps = attention.attention_maps(model, ids, [0, 1])
    for m in maps:
        assert m.probs.shape == (model.config.n_heads, len(ids), len(ids))
        np.testing.assert_allclose(m.probs.sum(-1), 1.0, rtol=1e-6)
        assert np.all(np.triu(m.probs, 1) == 0)  # the causal mask: no weight on later keys
        assert m.max_abs_diff <= attention.TOLERANCE * max(m.scale, 1.0)

    real = attention.causal_attention

    def no_scale(a, w_qkv, b_qkv, w_o, b_o, n_heads):  # a wrong recomputation must be caught
        return real(a, w_qkv * 3.0, b_qkv, w_o, b_o, n_heads)

    monkeypatch.setattr(attention, "causal_attention", no_scale)
    with pytest.raises(attention.AttentionMismatch):
        attention.attention_maps(model, ids, [1])


def test_every_path_the_report_names_exists() -> None:
    """File names in report.typ's prose and tables (tfgpt/, tests/, bench/, report/, docs/, runs/) are real."""
    source = build.TYP.read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w/])((?:tfgpt|tests|bench|report|docs|tokenizer)/[\w./-]*\.(?:py|md|png|json|yml))", source))
    assert len(named) > 10
    table = source[source.index("<tab:code>") - 2000: source.index("<tab:code>")]  # the code-map table
    named |= {f"tfgpt/{m}" for m in re.findall(r'code\("((?:training/)?[a-z_]+\.py)"\)', table) if not m.startswith("test_")}
    named |= {f"tests/{m}" for m in re.findall(r"\b(test_\w+\.py)", source)}
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"report.typ names files that do not exist: {missing}"
