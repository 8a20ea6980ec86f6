"""Build report/report.pdf from the shipped run's files: figures and numbers first, then Typst.

    python report/build.py                 # the release build: every input must be there
    python report/build.py --draft         # development: a missing samples.json is a marked placeholder
    python report/build.py --no-compile    # figures and numbers only

Reads (nothing in the PDF is typed by hand):
  runs/shipped/config.json, metrics.json     the recipe, the schedule, per-epoch history, the best epoch
  runs/shipped/eval.json                     `evaluate.py` on the 589 test stories (+ its sample statistics)
  runs/shipped/samples.json                  the 20 fixed-prompt stories (`python -m tfgpt.samples`)
  runs/shipped/model.keras, tokenizer/       the attention map (recomputed and checked, report/attention.py)
  logs/shipped/                              TensorBoard events: train/loss, train/learning_rate
  runs/experiments/*.json                    the recipe experiments (bench/experiments.py records)
  bench/RESULTS.md                           training and decoding speed against PyTorch and keras-hub
  bench/ngram_baseline.py                    run once per tokenizer and data (cached): unigram/bigram bits/byte
  data/tinystories + the run's tokenizer     story, token and byte counts of the splits (tfgpt's token cache)
  report/external.json                       the few figures from outside the repository, with their sources
and computes the keras-hub parity check itself. It writes report/build/numbers.json (every number and
sample the report prints) and report/build/fig/*.pdf (vector figures), then compiles report/report.typ
into report/report.pdf with the `typst` package (in-process; fonts embedded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "report"
BUILD = REPORT / "build"
FIG = BUILD / "fig"
CACHE = BUILD / "cache"
NUMBERS = BUILD / "numbers.json"
TYP = REPORT / "report.typ"
PDF = REPORT / "report.pdf"
for _p in (str(REPO), str(REPORT), str(REPO / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: The sentence of the attention figure (short enough that every token can be labelled).
ATTENTION_SENTENCE = "Tom had a red ball. He gave the ball to his sister Sue."
#: Words an excerpt of a sample runs to before it is cut at the next sentence end (at most EXCERPT_MAX).
EXCERPT_WORDS, EXCERPT_MAX = 42, 64
#: Prompt words that do not count for relevance (the prompt's content words are the rest).
STOPWORDS = frozenset(
    "a an the and or but of to in on at for with was were is are be had has have he she it they his her "
    "their there one day once upon time because very so that this went little big".split()
)
SAMPLES_COMMAND = "python -m tfgpt.samples"
#: The chart area of docs/tensorboard_scalars.png: (left, top, right, bottom) as fractions of the capture.
TENSORBOARD_CROP = (0.275, 0.085, 1.0, 0.775)


class BuildError(Exception):
    """An input is missing or unusable; the message is one line saying which and how to make it."""


# =========================================================================== reading the inputs
def read_json(path: Path, made_by: str) -> dict[str, Any]:
    """A JSON file, or BuildError naming the command that writes it."""
    if not path.is_file():
        raise BuildError(f"{rel(path)} is missing: it is written by `{made_by}`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BuildError(f"{rel(path)} is not JSON ({exc}); rewrite it with `{made_by}`") from None


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard log directory (all event files): tag -> sorted [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    files = sorted(logdir.glob("events.out.tfevents.*"))
    if not files:
        raise BuildError(f"no TensorBoard events in {rel(logdir)}: the training run writes them (--logdir)")
    series: dict[str, dict[int, float]] = {}
    for path in files:  # a resumed run appends a new file: later values of a step win
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("tensors", []):
            for ev in acc.Tensors(tag):
                value = tensor_util.make_ndarray(ev.tensor_proto)
                if value.dtype.kind == "f" and value.ndim == 0:
                    series.setdefault(tag, {})[int(ev.step)] = float(value)
    return {tag: sorted(v.items()) for tag, v in series.items()}


def md_sections(text: str) -> dict[str, list[list[list[str]]]]:
    """Markdown tables by the heading above them: heading -> [table, ...], table = rows of cells
    (header first, the |---| rule dropped). Headings are kept without their leading #s."""
    out: dict[str, list[list[list[str]]]] = {}
    heading, table = "", None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if table is None:
                table = []
                out.setdefault(heading, []).append(table)
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append(cells)
        else:
            table = None
    return out


def number(cell: str) -> float:
    """'**6,255**' -> 6255.0; '1.30' -> 1.3."""
    m = re.search(r"-?[\d,]*\.?\d+", cell.replace("**", ""))
    if not m:
        raise ValueError(f"no number in {cell!r}")
    return float(m.group(0).replace(",", ""))


def section(sections: dict[str, list[list[list[str]]]], starts: str) -> tuple[str, list[list[list[str]]]]:
    for heading, tables in sections.items():
        if heading.startswith(starts):
            return heading, tables
    raise BuildError(f"bench/RESULTS.md has no section starting {starts!r} (the report reads its tables)")


def bench_speed(path: Path) -> dict[str, Any]:
    """The training and decoding speed tables of bench/RESULTS.md that the report quotes."""
    if not path.is_file():
        raise BuildError(f"{rel(path)} is missing: bench/train_throughput.py and bench/decode_speed.py results")
    text = path.read_text(encoding="utf-8")
    sections = md_sections(text)
    dated = re.search(r"^## (\d{4}-\d\d-\d\d)", text, re.M)  # the newest dated section comes first
    date = dated.group(1) if dated else ""
    heading, tables = section(sections, "Training after the fused loss")
    train = {row[0].split(" ")[0]: {"tokens_per_sec": number(row[1]), "vs_torch": number(row[2]),
                                    "tokens_per_sec_s": f"{number(row[1]):,.0f}", "vs_torch_s": f"{number(row[2]):.2f}"}
             for row in tables[0][1:]}
    heading4, tables4 = section(sections, "Training: the requested table")
    header = tables4[0][0]
    median = next(r for r in tables4[0] if "median" in r[0])
    medians = {header[i].replace("*", ""): f"{number(median[i]):,.0f}" for i in range(2, 7)}
    dheading, dtables = section(sections, "Decoding")
    dhead = dtables[0][0]
    decode = []
    for row in dtables[0][1:]:
        rec = dict(zip(dhead, row, strict=True))
        decode.append({"engine": rec["engine"], "batch": int(number(rec["batch"])),
                       "tokens_per_sec": number(rec["tokens/s"]), "tokens_per_sec_s": f"{number(rec['tokens/s']):,.1f}",
                       "ms_per_step": number(rec["ms/step"]),
                       "vs_uncached": rec["vs uncached"]})
    return {"date": date, "train_heading": heading, "train": train, "median_heading": heading4,
            "median_of_4": medians, "decode_heading": dheading, "decode": decode, "source": rel(path)}


# =========================================================================== computed inputs
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_identity(source: str) -> list[Any]:
    root = REPO / source
    files = sorted(root.rglob("*")) if root.is_dir() else [root]
    return [[rel(p), p.stat().st_size, int(p.stat().st_mtime)] for p in files if p.is_file()]


def _cached(name: str, key: str, compute: Any) -> Any:
    """compute(), kept in report/build/cache/NAME-KEY.json (not in git) for the next build with the same key."""
    path = CACHE / f"{name}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["value"]
    value = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}))
    return value


def ngram_baselines(tokenizer_dir: Path, source: str, dev_fraction: float) -> dict[str, Any]:
    """bench/ngram_baseline.py's table (unigram and bigram, α chosen on dev, scored on the test stories),
    run once per tokenizer, data and dev fraction."""
    from tfgpt.tokenizer import Tokenizer

    sha = Tokenizer.load(tokenizer_dir).sha256
    command = [sys.executable, "bench/ngram_baseline.py", "--data", source, "--tokenizer", rel(tokenizer_dir),
               "--dev-fraction", f"{dev_fraction:g}"]

    def run() -> dict[str, Any]:
        print("  running " + " ".join(command[1:]) + " ...", flush=True)
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BuildError(f"bench/ngram_baseline.py failed: {last}")
        out: dict[str, Any] = {"command": "python " + " ".join(command[1:])}
        for line in proc.stdout.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0] in ("unigram", "bigram"):
                out[cells[0]] = {"alpha": number(cells[1]), "dev_bits_per_byte": number(cells[2]),
                                 "test_bits_per_byte": number(cells[3]), "test_loss": number(cells[4]),
                                 "test_perplexity": number(cells[5])}
        if "unigram" not in out or "bigram" not in out:
            raise BuildError("bench/ngram_baseline.py printed no unigram/bigram rows")
        return out

    return _cached("ngram", _digest(sha, _data_identity(source), dev_fraction), run)


def split_sizes(tokenizer_dir: Path, source: str, dev_fraction: float, context: int) -> dict[str, dict[str, int]]:
    """Stories, tokens (of the stream `eos s1 eos s2 … eos`, as training counts them), UTF-8 bytes and the
    stories longer than the context (with their eos) of the train, dev (when the run had one) and test
    splits; cached per tokenizer and data."""
    from tfgpt.stories import load_stories
    from tfgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    names = {"train": "train", "dev": "dev", "test": "validation"}
    if not dev_fraction:
        del names["dev"]

    def compute() -> dict[str, dict[str, int]]:
        out = {}
        for name, split in names.items():
            stories = list(load_stories(source, split, dev_fraction=dev_fraction))
            lengths = [len(ids) + 1 for ids in tok.encode_batch(stories)]
            # eos s1 eos s2 … eos: one eos before each story and the closing one (tfgpt's token cache counts the same)
            out[name] = {"stories": len(stories), "tokens": sum(lengths) + 1, "bytes": sum(len(s.encode()) for s in stories),
                         "longer_than_context": sum(n > context for n in lengths)}
        return out

    return _cached("splits", _digest(tok.sha256, _data_identity(source), dev_fraction, context), compute)


def train_vocabulary(source: str, dev_fraction: float) -> dict[str, Any]:
    """Lower-cased words of the training stories and the words written capitalised in ≥ 95 % of their
    ≥ 5 uses (names: Lily, Tom, ...), for the sample statistics; cached per data."""

    def compute() -> dict[str, Any]:
        from tfgpt.stories import load_stories

        lower, upper = Counter(), Counter()
        for story in load_stories(source, "train", dev_fraction=dev_fraction):
            for w in re.findall(r"[A-Za-z]+", story):
                (upper if w[0].isupper() else lower)[w.lower()] += 1
        names = sorted(w for w, n in upper.items() if n >= 5 and n >= 19 * lower[w] and w != "i")
        return {"words": sorted(set(lower) | set(upper)), "names": names}

    return _cached("vocabulary", _digest(_data_identity(source), dev_fraction), compute)


def parity() -> dict[str, Any]:
    """tfgpt vs keras-hub's GPT2Backbone with the same weights (the check of tests/test_reference_parity.py,
    made here so the report prints the measured difference), and both at GPT-2 small's size."""
    import keras
    import keras_hub
    import numpy as np
    from keras import ops

    from tfgpt.config import GPTConfig
    from tfgpt.model import build_model

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(4321)
    V, L, D, H, T = 300, 2, 64, 4, 32
    hub = keras_hub.models.GPT2Backbone(vocabulary_size=V, num_layers=L, num_heads=H, hidden_dim=D,
                                        intermediate_dim=4 * D, max_sequence_length=T, dropout=0.0)
    rng = np.random.default_rng(0)
    for var in hub.weights:
        var.assign(var.numpy() + rng.normal(0.0, 0.05, var.shape).astype("float32"))
    ours = build_model(GPTConfig(vocab_size=V, context=T, d_model=D, n_layers=L, n_heads=H))
    w = {var.path: var.numpy() for var in hub.weights}
    ours.embedding.token_embeddings.assign(w["token_embedding/embeddings"])
    ours.embedding.position_embeddings.assign(w["position_embedding/embeddings"])
    for i, block in enumerate(ours.blocks):
        p, att = f"transformer_layer_{i}/", f"transformer_layer_{i}/self_attention/"
        block.attn.qkv.kernel.assign(np.concatenate([w[f"{att}{n}/kernel"].reshape(D, D) for n in ("query", "key", "value")], 1))
        block.attn.qkv.bias.assign(np.concatenate([w[f"{att}{n}/bias"].reshape(D) for n in ("query", "key", "value")]))
        block.attn.out_proj.kernel.assign(w[f"{att}attention_output/kernel"].reshape(D, D))
        block.attn.out_proj.bias.assign(w[f"{att}attention_output/bias"])
        for ln, name in ((block.ln_1, "self_attention_layer_norm"), (block.ln_2, "feedforward_layer_norm")):
            ln.gamma.assign(w[f"{p}{name}/gamma"])
            ln.beta.assign(w[f"{p}{name}/beta"])
        for dense, name in ((block.ffn.fc_in, "feedforward_intermediate_dense"), (block.ffn.fc_out, "feedforward_output_dense")):
            dense.kernel.assign(w[f"{p}{name}/kernel"])
            dense.bias.assign(w[f"{p}{name}/bias"])
    ours.final_norm.gamma.assign(w["layer_norm/gamma"])
    ours.final_norm.beta.assign(w["layer_norm/beta"])
    ids = np.random.default_rng(T).integers(0, V, (3, T)).astype("int32")
    ref_h = hub({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    hidden = float(np.abs(ops.convert_to_numpy(ours.hidden_states(ids)) - ops.convert_to_numpy(ref_h)).max())
    ref_logits = ops.convert_to_numpy(hub.token_embedding(ref_h, reverse=True))
    logits = float(np.abs(ops.convert_to_numpy(ours(ids)) - ref_logits).max())
    small = GPTConfig.from_preset("gpt2-small")
    hub_small = keras_hub.models.GPT2Backbone(vocabulary_size=small.vocab_size, num_layers=small.n_layers,
                                              num_heads=small.n_heads, hidden_dim=small.d_model,
                                              intermediate_dim=small.d_ff, max_sequence_length=small.context)
    return {"config": {"V": V, "L": L, "D": D, "H": H, "T": T, "batch": 3}, "hidden_max_abs_diff": hidden,
            "logits_max_abs_diff": logits, "gpt2_small_parameters": small.num_parameters(),
            "keras_hub_gpt2_small_parameters": int(hub_small.count_params())}


def attention_figure(run_dir: Path, path: Path) -> dict[str, Any]:
    """Attention of the first layer and of the layer with the most previous-token attention on
    ATTENTION_SENTENCE, recomputed from the shipped model's weights and checked against its layers."""
    import attention
    import figures
    import keras

    from tfgpt.runs import load_model

    keras.mixed_precision.set_global_policy("float32")
    model, tok = load_model(run_dir)
    ids = [int(tok.eos_id), *tok.encode(ATTENTION_SENTENCE)]
    maps = attention.attention_maps(model, ids, list(range(len(model.blocks))))
    sharpest = max(maps[1:] or maps, key=lambda m: max(h["previous"] for h in m.head_stats))
    shown = [maps[0], sharpest] if sharpest is not maps[0] else [maps[0]]
    pieces = ["⟨eos⟩" if i == tok.eos_id else tok.id_to_piece(i).replace("▁", "") for i in ids]
    as_dict = [{"layer": m.layer, "probs": m.probs.round(4).tolist(), "head_stats": m.head_stats} for m in shown]
    figures.attention(as_dict, pieces, path)
    every = [{"layer": m.layer, "max_abs_diff": m.max_abs_diff, "ln_max_abs_diff": m.ln_max_abs_diff,
              "head_stats": m.head_stats} for m in maps]
    best_head = max(((m.layer, h, s) for m in maps for h, s in enumerate(m.head_stats)), key=lambda x: x[2]["previous"])
    first_head = max(((m.layer, h, s) for m in maps for h, s in enumerate(m.head_stats)), key=lambda x: x[2]["first"])
    return {"sentence": ATTENTION_SENTENCE, "tokens": pieces, "shown_layers": [m.layer + 1 for m in shown],
            "layers": every, "tolerance": attention.TOLERANCE,
            "max_abs_diff": max(m.max_abs_diff for m in maps),
            "previous_head": {"layer": best_head[0] + 1, "head": best_head[1] + 1, "share": best_head[2]["previous"]},
            "first_head": {"layer": first_head[0] + 1, "head": first_head[1] + 1, "share": first_head[2]["first"]}}


# =========================================================================== sample statistics
_WORD = re.compile(r"\w+|[^\w\s]")


def sample_statistics(texts: list[str], repetition_n: int = 4) -> dict[str, float]:
    """distinct-1, distinct-2 and the repetition rate (share of repeated 4-grams per text, averaged) of
    `texts`, with the definitions of tfgpt.evaluation.sample_statistics (tests/test_report.py checks)."""
    toks = [_WORD.findall(t.lower()) for t in texts]

    def grams(ts: list[str], n: int) -> list[tuple[str, ...]]:
        return [tuple(ts[i : i + n]) for i in range(len(ts) - n + 1)]

    def distinct(n: int) -> float:
        g = [x for ts in toks for x in grams(ts, n)]
        return len(set(g)) / len(g) if g else 0.0

    reps = [1.0 - len(set(g)) / len(g) for g in (grams(ts, repetition_n) for ts in toks) if g]
    return {"distinct_1": distinct(1), "distinct_2": distinct(2),
            "repetition_rate": float(statistics.fmean(reps)) if reps else 0.0,
            "mean_words": float(statistics.fmean(len(t) for t in toks)) if toks else 0.0}


def story_measures(sample: dict[str, Any], vocab: set[str], names: set[str], tokenizer: Any) -> dict[str, Any]:
    """Per sample: words, words never seen in training (invented), distinct names, whether it stopped
    before the token limit (at the end-of-text token), the prompt's content words it reuses, and its
    most repeated 4-gram."""
    words = re.findall(r"[A-Za-z]+", sample["text"])
    lower = [w.lower() for w in words]
    content = {w.lower() for w in re.findall(r"[A-Za-z]+", sample["prompt"])} - STOPWORDS
    grams = Counter(tuple(lower[i : i + 4]) for i in range(len(lower) - 3))
    top = grams.most_common(1)[0] if grams else (("",), 0)
    story_names = list(dict.fromkeys(w for w in words if w.lower() in names))
    return {"words": len(words), "invented": sum(w not in vocab for w in lower),
            "invented_words": list(dict.fromkeys(w for w in words if w.lower() not in vocab)),
            "names": len(story_names), "name_list": story_names,
            "ended": len(tokenizer.encode(sample["text"])) < sample["max_new_tokens"] - 2,
            "prompt_words": len(content), "prompt_reused": len(content & set(lower)),
            "top_4gram": " ".join(top[0]), "top_4gram_count": top[1]}


MODES = (("greedy", "greedy"), ("temperature", "temperature 0.8"), ("top-p", "top-p 0.9"))


def samples_block(samples: list[dict[str, Any]], vocab: set[str], names: set[str], tokenizer: Any) -> dict[str, Any]:
    """Statistics per decoding mode, the excerpts the report prints, and every sample in full."""
    measured = [{**s, **story_measures(s, vocab, names, tokenizer)} for s in samples]
    per_mode = {}
    for mode, label in MODES:
        group = [s for s in measured if s["mode"] == mode]
        if not group:
            continue
        st = sample_statistics([s["text"] for s in group])
        words = sum(s["words"] for s in group)
        with_prompt = [s for s in group if s["prompt_words"]]
        worst = max(group, key=lambda s: s["top_4gram_count"])
        most_named = max(group, key=lambda s: s["names"])
        invented = list(dict.fromkeys(w for s in group for w in s["invented_words"]))
        settings = sorted({settings_text(s) for s in group})
        per_mode[mode] = {
            "label": label, "settings": settings, "n": len(group), **st,
            "ended_rate": sum(s["ended"] for s in group) / len(group),
            "invented_per_1000": 1000 * sum(s["invented"] for s in group) / max(words, 1),
            "names_per_story": statistics.fmean(s["names"] for s in group),
            "prompt_reuse": (sum(s["prompt_reused"] for s in with_prompt) / max(sum(s["prompt_words"] for s in with_prompt), 1)),
            "worst_4gram": worst["top_4gram"], "worst_4gram_count": worst["top_4gram_count"], "worst_id": worst["id"],
            "invented_examples": invented[:6], "most_names_id": most_named["id"], "most_names": most_named["name_list"],
        }
    return {"per_mode": per_mode, "excerpt_words": EXCERPT_WORDS, "shown": [excerpt(s) for s in pick_excerpts(measured)],
            "all": [{k: s[k] for k in ("id", "prompt", "mode", "temperature", "top_k", "top_p", "seed",
                                       "max_new_tokens", "text", "ended", "invented", "names")} for s in measured]}


def settings_text(s: dict[str, Any]) -> str:
    """The sampling settings of a samples.json record in words (the wording of runs/shipped/samples.md)."""
    from tfgpt.samples import describe

    return describe(s)


def pick_excerpts(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every mode for the second distinct prompt (the first one that is a whole sentence), and the first
    sampled story from the empty prompt: the same prompt under each decoder, and a story from nothing."""
    prompts = list(dict.fromkeys(s["prompt"] for s in samples))
    chosen = prompts[1] if len(prompts) > 1 else (prompts[0] if prompts else "")
    shown = [s for s in samples if s["prompt"] == chosen]
    seen_modes: set[tuple[str, str]] = set()
    shown = [s for s in shown if (s["mode"], s["prompt"]) not in seen_modes and not seen_modes.add((s["mode"], s["prompt"]))]
    free = [s for s in samples if s["prompt"] == "" and s["mode"] == "temperature"]
    return shown + free[:1] if chosen != "" else shown


def excerpt(s: dict[str, Any]) -> dict[str, Any]:
    words = s["text"].split(" ")
    cut = len(words)
    if len(words) > EXCERPT_MAX:
        ends = [i + 1 for i in range(EXCERPT_WORDS, EXCERPT_MAX) if re.search(r"[.!?][\"”]?$", words[i])]
        cut = ends[0] if ends else EXCERPT_MAX
    return {"id": s["id"], "prompt": s["prompt"], "settings": settings_text(s), "mode": s["mode"],
            "text": " ".join(words[:cut]).replace("\n", " "), "cut": cut < len(words), "words": s["words"],
            "ended": s["ended"]}


# =========================================================================== the numbers
def fmt(x: float, digits: int = 3) -> str:
    return f"{x:,.{digits}f}"


def m(x: float, digits: int = 2) -> str:
    return f"{x / 1e6:,.{digits}f} M"


def experiment_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    import experiments as exp

    rows, last_group = [], None
    for group, r in exp.ordered(records):
        rows.append({"group": group if group != last_group else "", "name": r["name"], "note": r["note"],
                     "params": m(r["parameters"]), "tokens": m(r["tokens"]), "epochs": fmt(r["epochs"], 2),
                     "minutes": fmt(r["train_minutes"], 1), "tokens_per_sec": f"{r['tokens_per_sec']:,.0f}",
                     "dev_bpb": fmt(r["best_dev_bpb"], 4),
                     "test_bpb": fmt(r["test_bpb"], 4) if r.get("test_bpb") is not None else "–"})
        last_group = group
    return {"rows": rows}


def scaling_block(records: list[dict[str, Any]]) -> dict[str, Any]:
    import experiments as exp

    group, fit = exp.data_scaling(records)
    points = [{"name": r["name"], "fraction": r["train"]["train_fraction"], "dev_bpb": r["best_dev_bpb"],
               "test_bpb": r.get("test_bpb"), "epochs": r["epochs"]} for r in group]
    out: dict[str, Any] = {"points": points, "fit": None}
    if fit:
        e, a, alpha = fit
        out["fit"] = {"E": e, "A": a, "alpha": alpha, "alpha_at_grid_edge": alpha >= 2.999,
                      "projection_4x": e + a * 4.0**-alpha, "projection_10x": e + a * 10.0**-alpha}
    return out


def collect(run_dir: Path, logdir: Path, draft: bool, with_model: bool) -> dict[str, Any]:
    """Every number, table row and sample of the report, from the files named in the module docstring."""
    import experiments as exp
    import figures

    from tfgpt.tokenizer import Tokenizer

    notes: list[str] = []
    config = read_json(run_dir / "config.json", "python train_keras.py ...")
    metrics = read_json(run_dir / "metrics.json", "python train_keras.py ...")
    ev = read_json(run_dir / "eval.json", f"python evaluate.py --model {rel(run_dir)} --samples 32 --seed 0 "
                   f"--temperature 0.8 --json {rel(run_dir)}/eval.json")
    samples_path = run_dir / "samples.json"
    if samples_path.is_file() or not draft:
        samples_doc = read_json(samples_path, SAMPLES_COMMAND)
        samples = samples_doc["samples"]
    else:
        samples_doc, samples = {"command": SAMPLES_COMMAND, "model": rel(run_dir)}, []
        notes.append(f"{rel(samples_path)} is missing: no samples in this draft")
    tb = scalars(logdir)
    if "train/loss" not in tb:
        raise BuildError(f"{rel(logdir)} has no train/loss scalars (tfgpt/training/callbacks.py writes them)")
    records = exp.load_records()
    if not records:
        raise BuildError("runs/experiments/ holds no records: bench/experiments.py run ... writes them")
    external = read_json(REPORT / "external.json", "hand-kept sources list (report/external.json)")

    model_cfg, train_cfg, sched = config["model"], config["train"], config["schedule"]
    dev_fraction = float(train_cfg.get("dev_fraction") or 0.0)
    source = train_cfg["data"]
    tokenizer_dir = run_dir / config.get("tokenizer", "tokenizer")
    if not (tokenizer_dir / "tokenizer.model").is_file() and (run_dir / "tokenizer").is_dir():
        tokenizer_dir = run_dir / "tokenizer"
    tok = Tokenizer.load(tokenizer_dir)
    print("  split sizes, n-gram baselines, training vocabulary ...", flush=True)
    sizes = split_sizes(tokenizer_dir, source, dev_fraction, int(model_cfg["context"]))
    ngram = ngram_baselines(tokenizer_dir, source, dev_fraction or 0.05)
    vocab = train_vocabulary(source, dev_fraction)

    epochs = metrics["epochs"]
    best = next((e for e in epochs if e["epoch"] == metrics["best_epoch"]), epochs[-1])
    dev = sizes.get("dev")
    to_bpb = (dev["tokens"] / dev["bytes"] / math.log(2)) if dev else None
    train_text = sizes["train"]["bytes"] + (dev["bytes"] if dev else 0)
    train_stories = sizes["train"]["stories"] + (dev["stories"] if dev else 0)
    tokens_per_story = sizes["train"]["tokens"] / sizes["train"]["stories"]
    full_tokens = external["tinystories"]["train_stories"] * tokens_per_story
    gpt2 = next((r for r in records if r["name"] == "gpt2-small"), None)
    llm_c = external["llm_c"]
    a100_rate = llm_c["tokens"] / (llm_c["minutes"] * 60) / llm_c["gpus"]
    n = {
        "draft": draft and bool(notes), "notes": notes,
        "run": {"dir": rel(run_dir), "logdir": rel(logdir), "name": config.get("run_name", run_dir.name)},
        "model": {**model_cfg, "parameters": config["resolved"]["parameters"],
                  "parameters_s": f"{config['resolved']['parameters']:,}",
                  "parameters_m": fmt(config["resolved"]["parameters"] / 1e6, 1), "d_k": model_cfg["d_model"] // model_cfg["n_heads"]},
        "train": {**{k: train_cfg[k] for k in ("lr", "weight_decay", "beta1", "beta2", "clipnorm", "dropout", "batch_size",
                                              "min_lr_ratio", "seed", "log_every")},
                  "dev_fraction": dev_fraction, "warmup": sched.get("warmup", train_cfg.get("warmup")),
                  "steps_per_epoch": sched["steps_per_epoch"], "total_steps": sched["total_steps"],
                  "tokens_per_step": sched["tokens_per_step"], "precision": config["resolved"]["precision"],
                  "xla": config["resolved"]["xla"], "global_step": metrics["global_step"],
                  "epochs_run": len([e for e in epochs if not e.get("partial")]),
                  "tokens_seen": metrics["tokens_seen"], "tokens_seen_m": fmt(metrics["tokens_seen"] / 1e6, 1),
                  "epochs_of_text": fmt(metrics["tokens_seen"] / sizes["train"]["tokens"], 1),
                  "wall_minutes": fmt(metrics["wall_time_s"] / 60, 0), "tokens_per_sec": f"{metrics['tokens_per_sec']:,.0f}",
                  "status": metrics["status"], "best_epoch": metrics["best_epoch"], "best_step": best["step"],
                  "best_val_loss": fmt(metrics["best_val_loss"]), "final_train_loss": fmt(metrics["final_train_loss"]),
                  "best_dev_bpb": fmt(metrics["best_val_loss"] * to_bpb, 3) if to_bpb else None,
                  "last_epoch": epochs[-1]["epoch"], "last_val_loss": fmt(epochs[-1]["val_loss"]),
                  "last_train_loss": fmt(epochs[-1]["train_loss"]),
                  "best_is_last": best["epoch"] == epochs[-1]["epoch"],
                  "test_above_best": ev["loss"] > metrics["best_val_loss"],
                  "test_minus_best": fmt(abs(ev["loss"] - metrics["best_val_loss"])),
                  "epochs": [{k: e[k] for k in ("epoch", "step", "train_loss", "val_loss")} for e in epochs],
                  "epoch_rows": [{"epoch": str(e["epoch"]) + (" (partial)" if e.get("partial") else ""),
                                  "tokens": fmt(e["tokens_seen"] / 1e6, 1), "lr": f"{e['learning_rate']:.2e}",
                                  "train_loss": fmt(e["train_loss"]), "val_loss": fmt(e["val_loss"]),
                                  "val_bpb": fmt(e["val_loss"] * to_bpb) if to_bpb else "–",
                                  "best": e["epoch"] == metrics["best_epoch"]} for e in epochs],
                  "versions": config.get("versions", {})},
        "data": {**sizes, "test_mean_tokens": fmt(sizes["test"]["tokens"] / sizes["test"]["stories"], 0),
                 "test_over_context_pct": fmt(100 * sizes["test"]["longer_than_context"] / sizes["test"]["stories"], 0),
                 "rows": [{"split": k, **{f: f"{v[f]:,}" for f in ("stories", "tokens", "bytes")}}
                                   for k, v in sizes.items()], "source": source, "train_text_mb": fmt(train_text / 1e6, 1), "train_stories": f"{train_stories:,}",
                 "bytes_per_token": fmt(sizes["train"]["bytes"] / sizes["train"]["tokens"], 2),
                 "share_of_tinystories_pct": fmt(100 * train_stories / external["tinystories"]["train_stories"], 2),
                 "tinystories_train_stories": f"{external['tinystories']['train_stories']:,}",
                 "full_tokens_m": fmt(full_tokens / 1e6, 0), "vocab_size": tok.vocab_size},
        "test": {"loss": fmt(ev["loss"]), "perplexity": fmt(ev["perplexity"], 2), "bpb": fmt(ev["bits_per_byte"]),
                 "tokens": f"{ev['tokens']:,}", "bytes": f"{ev['bytes']:,}", "stories": f"{ev['stories']:,}",
                 "context": ev["context"], "stride": ev["stride"], "raw": {k: ev[k] for k in ("loss", "perplexity", "bits_per_byte")}},
        "eval_samples": {**ev.get("samples", {}),
                         **{k + "_s": fmt(ev["samples"][k], 3) for k in ("distinct_1", "distinct_2", "repetition_rate", "eos_rate")
                            if ev.get("samples", {}).get(k) is not None}},
        "baselines": {**{k: {**ngram[k], "bpb_s": fmt(ngram[k]["test_bits_per_byte"]),
                             "ppl_s": fmt(ngram[k]["test_perplexity"], 1), "loss_s": fmt(ngram[k]["test_loss"]),
                             "alpha_s": f"{ngram[k]['alpha']:g}"} for k in ("unigram", "bigram")},
                      "command": ngram["command"],
                      "pytorch": {**external["pytorch_reference"], "bpb_s": fmt(external["pytorch_reference"]["test_bits_per_byte"])},
                      "beats_pytorch": ev["bits_per_byte"] < external["pytorch_reference"]["test_bits_per_byte"],
                      "vs_bigram_pct": fmt(100 * (1 - ev["bits_per_byte"] / ngram["bigram"]["test_bits_per_byte"]), 0)},
        "experiments": experiment_table(records),
        "records": {r["name"]: {k: r.get(k) for k in ("parameters", "tokens", "epochs", "train_minutes", "tokens_per_sec",
                                                     "best_dev_bpb", "best_step", "test_bpb", "note")} for r in records},
        "scaling": scaling_block(records),
        "speed": bench_speed(REPO / "bench" / "RESULTS.md"),
        "gpt2_small": None if gpt2 is None else {
            "tokens_per_sec": f"{gpt2['tokens_per_sec']:,.0f}", "parameters_m": fmt(gpt2["parameters"] / 1e6, 0),
            "days_5_epochs": fmt(5 * full_tokens / gpt2["tokens_per_sec"] / 86400, 0),
            "a100_hours_5_epochs": fmt(5 * full_tokens / a100_rate / 3600, 1), "a100_tokens_per_sec_k": fmt(a100_rate / 1e3, 0),
            "release_tokens_m": fmt(gpt2["tokens_per_sec"] * metrics["wall_time_s"] / 1e6, 1)},
        "samples_command": samples_doc.get("command", SAMPLES_COMMAND),
        "figures": {},
    }
    n["scaling"]["fit_s"] = None if not n["scaling"]["fit"] else {
        k: fmt(v, 4 if k != "alpha" else 2) for k, v in n["scaling"]["fit"].items() if isinstance(v, float)}
    n["samples"] = samples_block(samples, set(vocab["words"]), set(vocab["names"]), tok)
    pm = n["samples"]["per_mode"]
    for mode in pm.values():
        for k in ("distinct_1", "distinct_2", "repetition_rate", "ended_rate", "prompt_reuse"):
            mode[k + "_s"] = fmt(mode[k], 2)
        mode["invented_s"], mode["names_s"], mode["words_s"] = (fmt(mode["invented_per_1000"], 1),
                                                                fmt(mode["names_per_story"], 1), fmt(mode["mean_words"], 0))
    if "greedy" in pm and "temperature" in pm:
        g, t = pm["greedy"], pm["temperature"]
        n["samples"]["compare"] = {
            "repetition": "higher" if g["repetition_rate"] > t["repetition_rate"] else "lower",
            "distinct_2": "lower" if g["distinct_2"] < t["distinct_2"] else "higher",
            "invented": "more" if t["invented_per_1000"] > g["invented_per_1000"] else "fewer",
            "names": "more" if t["names_per_story"] > g["names_per_story"] else "fewer"}

    print("  figures ...", flush=True)
    FIG.mkdir(parents=True, exist_ok=True)
    figures.learning_curves(tb["train/loss"], tb.get("train/learning_rate", []), n["train"]["epochs"], best["step"],
                            sched["tokens_per_step"], ev["loss"], "dev" if dev_fraction else "validation",
                            FIG / "learning_curves.pdf")
    by = {r["name"]: r for r in records}
    labels = {"s3": "D 192, L 4", "s6": "D 256, L 6", "s12": "D 384, L 6", "s6-post": "post-LN",
              "s6-sin": "sinusoidal P"}
    size = [{**by[k], "label": labels[k]} for k in ("s3", "s6", "s12") if k in by]
    abl = [{**by[k], "label": labels.get(k, "pre-LN, learned P" if k == "s6" else k)} for k in ("s6", "s6-post", "s6-sin") if k in by]
    for r in abl:
        if r["name"] == "s6":
            r["label"] = "pre-LN, learned P"
    figures.experiments(size, abl, n["scaling"], FIG / "experiments.pdf")
    # TensorBoard's chart area (without its sidebar and the last, per-step tokens/s chart), for Fig. 4
    figures.crop(REPO / "docs" / "tensorboard_scalars.png", TENSORBOARD_CROP, FIG / "tensorboard_scalars_charts.png")
    n["figures"] = {"learning_curves": "build/fig/learning_curves.pdf", "experiments": "build/fig/experiments.pdf",
                    "tensorboard": "build/fig/tensorboard_scalars_charts.png"}
    if with_model:
        print("  attention map (loading the model) ...", flush=True)
        n["attention"] = attention_figure(run_dir, FIG / "attention.pdf")
        n["attention"]["max_abs_diff_s"] = f"{n['attention']['max_abs_diff']:.1e}"
        n["figures"]["attention"] = "build/fig/attention.pdf"
        print("  keras-hub parity ...", flush=True)
        n["parity"] = parity()
        n["parity"].update({"hidden_s": f"{n['parity']['hidden_max_abs_diff']:.1e}",
                            "logits_s": f"{n['parity']['logits_max_abs_diff']:.1e}",
                            "gpt2_small_s": f"{n['parity']['gpt2_small_parameters']:,}",
                            "hub_small_s": f"{n['parity']['keras_hub_gpt2_small_parameters']:,}"})
    else:
        old = json.loads(NUMBERS.read_text()) if NUMBERS.is_file() else {}
        if "attention" not in old or not (FIG / "attention.pdf").is_file():
            raise BuildError("--no-model needs an earlier full build (report/build/numbers.json with the attention map)")
        n["attention"], n["parity"], n["figures"]["attention"] = old["attention"], old["parity"], "build/fig/attention.pdf"
    n["inputs"] = {rel(p): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                   for p in [run_dir / "config.json", run_dir / "metrics.json", run_dir / "eval.json", samples_path,
                             run_dir / "model.keras", REPO / "bench" / "RESULTS.md", REPORT / "external.json",
                             *sorted((REPO / "runs" / "experiments").glob("*.json"))] if p.is_file()}
    return n


def compile_pdf(typ: Path = TYP, pdf: Path = PDF) -> int:
    """report.typ -> report.pdf (typst in-process, the repository as the root, only the fonts typst embeds, so the
    same inputs give the same bytes on any machine). Returns the page count."""
    import typst

    data = typst.compile(str(typ), root=str(REPO), ignore_system_fonts=True)
    tmp = pdf.with_name(f".{pdf.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(pdf)
    import pypdf

    return len(pypdf.PdfReader(pdf).pages)


def body_pages(typ: Path = TYP) -> int:
    """The page where the report's body ends (the `<body-end>` mark before the references)."""
    import typst

    return int(json.loads(typst.query(str(typ), "<body-end>", field="value", root=str(REPO),
                                       ignore_system_fonts=True))[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=REPO / "runs" / "shipped")
    p.add_argument("--logdir", type=Path, default=None, help="TensorBoard events (default logs/<run name>)")
    p.add_argument("--draft", action="store_true", help="a missing samples.json becomes a marked placeholder")
    p.add_argument("--no-model", action="store_true", help="keep the attention map and parity of the last build")
    p.add_argument("--no-compile", action="store_true", help="figures and numbers.json only")
    args = p.parse_args(argv)
    logdir = args.logdir or REPO / "logs" / args.run.name
    try:
        print(f"report: reading {rel(args.run)} and {rel(logdir)}", flush=True)
        numbers = collect(args.run, logdir, args.draft, not args.no_model)
        BUILD.mkdir(parents=True, exist_ok=True)
        tmp = NUMBERS.with_name(".numbers.json.tmp")
        tmp.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(NUMBERS)
        print(f"  wrote {rel(NUMBERS)} and {rel(FIG)}/", flush=True)
        if not args.no_compile:
            pages, body = compile_pdf(), body_pages()
            print(f"  wrote {rel(PDF)}: {pages} pages, the body on {body}" + (" (over the limit of 5)" if body > 5 else "")
                  + (" (DRAFT: " + "; ".join(numbers["notes"]) + ")" if numbers["draft"] else ""))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
