"""Write a run's sample sheet: 20 stories from fixed prompts and seeds, with the settings beside each.

    python -m tfgpt.samples                                   # runs/shipped -> runs/shipped/samples.md + .json
    python -m tfgpt.samples --model runs/my-run --out runs/my-run/samples.md

Five prompts, each continued four ways: greedy (temperature 0), temperature 0.8 with two seeds, and nucleus
sampling (top-p 0.9 at temperature 1). The same model gives the same sheet on every run (fixed seeds). The
Markdown is for people; `samples.json` beside it holds the same stories for programs (the report reads it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tfgpt.cli import OneLineParser, add_model_args, fail, load_or_exit, positive_int_arg
from tfgpt.common import SHIPPED_RUN, atomic_write

#: The story openings of the sheet ("" = from the end-of-text token alone, a story from scratch).
PROMPTS: tuple[str, ...] = (
    "Once upon a time",
    "Tom had a red ball.",
    "One day, a little girl named Lily went to the park.",
    "The old dog was sad because",
    "",
)


@dataclass(frozen=True)
class Setting:
    """One way of sampling: `mode` names it; temperature 0 is greedy (seed unused)."""

    mode: str
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


#: The four settings each prompt is continued with.
SETTINGS: tuple[Setting, ...] = (
    Setting("greedy", 0.0),
    Setting("temperature", 0.8, seed=0),
    Setting("temperature", 0.8, seed=1),
    Setting("top-p", 1.0, top_p=0.9, seed=0),
)

COMMAND = "python -m tfgpt.samples"


def sample_sheet(
    model: Any, tokenizer: Any, prompts: Sequence[str] = PROMPTS, settings: Sequence[Setting] = SETTINGS,
    max_new_tokens: int = 256,
) -> list[dict[str, Any]]:
    """Every (prompt, setting) story as a record: id, prompt, the setting's fields, the seed used, text.

    All prompts of one setting run as one batch; row r samples with seed + r (`tfgpt.generation.generate`),
    so the record's `seed` is that row's own seed: `generate.py --prompt P --seed S` with the same settings
    and --max-new-tokens reproduces it.
    """
    from tfgpt.generation import generate_text

    records = []
    for setting in settings:
        texts = generate_text(model, tokenizer, list(prompts), max_new_tokens, temperature=setting.temperature,
                              top_k=setting.top_k, top_p=setting.top_p, seed=setting.seed)
        for row, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            records.append({**asdict(setting), "seed": setting.seed + row, "prompt": prompt,
                            "max_new_tokens": max_new_tokens, "text": text})
    records.sort(key=lambda r: prompts.index(r["prompt"]))  # grouped by prompt, settings in order (stable sort)
    return [{"id": i + 1, **r} for i, r in enumerate(records)]


def describe(record: dict[str, Any]) -> str:
    """The settings of a record in words, e.g. "temperature 0.8, seed 1"."""
    if record["temperature"] == 0:
        return "greedy (temperature 0)"
    parts = [f"temperature {record['temperature']:g}"]
    if record["top_k"]:
        parts.append(f"top-k {record['top_k']}")
    if record["top_p"] < 1:
        parts.append(f"top-p {record['top_p']:g}")
    return ", ".join([*parts, f"seed {record['seed']}"])


def to_markdown(records: Sequence[dict[str, Any]], model_desc: str, command: str) -> str:
    """The sheet as Markdown: a heading per story with its settings, the prompt in bold, the text quoted."""
    lines = [f"# Samples from {model_desc}", "",
             f"Written by `{command}`: {len(records)} stories, each prompt continued greedily, at temperature "
             "0.8 with two seeds, and with nucleus sampling; up to "
             f"{records[0]['max_new_tokens'] if records else 0} new tokens, stopping at the end-of-text token. "
             "Reproduce one with `python generate.py --prompt TEXT --temperature T --top-p P --seed S "
             "--max-new-tokens N`.", ""]
    for r in records:
        prompt = r["prompt"] if r["prompt"] else "(no prompt: from scratch)"
        lines += [f"## {r['id']}. {prompt}", "", f"*{describe(r)}*", ""]
        body = (f"**{r['prompt']}**" if r["prompt"] else "") + r["text"]
        lines += [f"> {line}" if line else ">" for line in body.strip().split("\n")]
        lines.append("")
    return "\n".join(lines)


def write_sheet(records: Sequence[dict[str, Any]], out: Path, model_desc: str, command: str) -> Path:
    """Write `out` (Markdown) and its .json twin atomically; returns the JSON path."""
    json_path = out.with_suffix(".json")
    atomic_write(json_path, (json.dumps({"command": command, "model": model_desc, "samples": list(records)},
                                        indent=2, ensure_ascii=False) + "\n").encode())
    atomic_write(out, to_markdown(records, model_desc, command).encode())
    return json_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tfgpt.samples", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--out", default=None, help="Markdown file to write, with a .json twin "
                        "[default: <model run>/samples.md]")
    parser.add_argument("--max-new-tokens", type=positive_int_arg, default=256)
    args = parser.parse_args(argv)
    model_path = Path(args.model or SHIPPED_RUN)
    out = Path(args.out) if args.out else (model_path if model_path.is_dir() else model_path.parent) / "samples.md"
    if out.suffix != ".md":
        fail(f"--out {out} must name a .md file (its .json twin is written beside it)")
    if not out.parent.is_dir():
        fail(f"--out {out}: folder {out.parent} does not exist; create it or pick another --out")
    model, tokenizer = load_or_exit(args.model, args.tokenizer)
    records = sample_sheet(model, tokenizer, max_new_tokens=args.max_new_tokens)
    command = COMMAND + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    json_path = write_sheet(records, out, str(model_path), command)
    print(f"wrote {out} and {json_path} ({len(records)} stories)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
