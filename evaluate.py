"""Evaluate a tfgpt model on held-out stories: loss, perplexity, bits per byte, and sample quality.

    python evaluate.py                                  # shipped model, bundled validation stories
    python evaluate.py --data my_stories.txt            # a text file without a validation split: all of it
    python evaluate.py --model runs/cpu-small --data roneneldan/TinyStories --json eval.json

Scores every story from its own start (after an end-of-text token) with full left context up to the
model's window (a sliding window with --stride for longer stories); see tfgpt/evaluation.py for the
definitions. Then samples --samples stories from scratch and reports distinct-1/2, the repetition rate
and the share that ended with the end-of-text token (--samples 0 skips this).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tfgpt.cli import (
    OneLineParser,
    add_model_args,
    add_sampling_args,
    fail,
    load_or_exit,
    non_negative_int_arg,
    positive_int_arg,
)
from tfgpt.common import BUNDLED_DATA, HF_SOURCE, REPO_ROOT, repo_relative


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--data", default=None,
                        help=f"story source: HF dataset id, directory or file (default: {BUNDLED_DATA}, the bundled "
                             "TinyStories sample)")
    parser.add_argument("--split", default=None,
                        help="split to score: validation, train or all (default: the source's validation split, "
                             "or all its stories when it has none)")
    parser.add_argument("--stride", type=positive_int_arg, default=None,
                        help="sliding-window stride for stories longer than the context (default context/2)")
    parser.add_argument("--batch-size", type=positive_int_arg, default=16)
    parser.add_argument("--max-stories", type=positive_int_arg, default=None, help="score only the first N stories")
    parser.add_argument("--samples", type=non_negative_int_arg, default=32,
                        help="stories to sample for the quality measures (0 = none)")
    parser.add_argument("--sample-tokens", type=positive_int_arg, default=256, help="max new tokens per sample")
    add_sampling_args(parser, temperature=1.0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.json is not None:  # checked now, not after the whole evaluation
        out = Path(args.json)
        if out.is_dir():
            parser.error(f"--json {args.json} is a directory; name a file such as {out / 'eval.json'}")
        if not out.parent.is_dir():
            parser.error(f"--json {args.json}: folder {out.parent} does not exist; create it or name another file")
    if args.seed is None:
        args.seed = 0  # evaluation is deterministic
    if args.data is None:
        bundled = REPO_ROOT / BUNDLED_DATA
        args.data = repo_relative(bundled) if Path.cwd() == REPO_ROOT else str(bundled)
        if not bundled.exists():
            args.data = HF_SOURCE
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_or_exit(args.model, args.tokenizer)

    from tfgpt.evaluation import EvaluationError, run_evaluation

    try:
        run_evaluation(model, tokenizer, model_path=args.model, data=args.data, split=args.split, stride=args.stride,
                       batch_size=args.batch_size, max_stories=args.max_stories, samples=args.samples,
                       sample_tokens=args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, jit_compile=args.xla, progress=not args.no_progress,
                       json_path=args.json)
    except EvaluationError as exc:
        fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
