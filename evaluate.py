"""Evaluate a tfgpt model on held-out stories: loss, perplexity, bits per byte, and sample quality.

    python evaluate.py                                  # shipped model, shared validation text
    python evaluate.py --model runs/cpu-small --data roneneldan/TinyStories --json eval.json

Scores every story from its own start (after an end-of-text token) with full left context up to the
model's window (a sliding window with --stride for longer stories); see tfgpt/evaluation.py for the
definitions. Then samples --samples stories from scratch and reports distinct-1/2, the repetition rate
and the share that ended with the end-of-text token (--samples 0 skips this).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from generate import (
    OneLineParser,
    add_model_args,
    add_sampling_args,
    check_model_path,
    fail,
    load,
    positive_int_arg,
)

REPO = Path(__file__).resolve().parent
#: The shared TinyStories text beside the repository, when it is there.
SHARED_DATA = REPO.parent / "shared" / "data" / "tinystories"


def parse_args(argv: Sequence[str] | None):
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--data", default=None,
                        help=f"story source (default: {SHARED_DATA} when it exists, else tfgpt.data.DEFAULT_SOURCE)")
    parser.add_argument("--split", default="validation", help="split of --data to score (default validation)")
    parser.add_argument("--stride", type=positive_int_arg, default=None,
                        help="sliding-window stride for stories longer than the context (default context/2)")
    parser.add_argument("--batch-size", type=positive_int_arg, default=16)
    parser.add_argument("--max-stories", type=positive_int_arg, default=None, help="score only the first N stories")
    parser.add_argument("--samples", type=int, default=32, help="stories to sample for the quality measures (0 = none)")
    parser.add_argument("--sample-tokens", type=positive_int_arg, default=256, help="max new tokens per sample")
    add_sampling_args(parser, temperature=1.0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.samples < 0:
        parser.error(f"argument --samples: must be >= 0, got {args.samples}")
    if args.seed is None:
        args.seed = 0  # evaluation is deterministic
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)
    model, tokenizer = load(args)

    from tfgpt.common import atomic_write
    from tfgpt.data import DEFAULT_SOURCE, DataError, load_stories
    from tfgpt.evaluation import EvaluationError, evaluate_model, sample_quality
    from tfgpt.runs import DEFAULT_MODEL

    if args.data is None:
        args.data = str(SHARED_DATA) if SHARED_DATA.exists() else DEFAULT_SOURCE
    try:
        stories = load_stories(args.data, args.split)
        scores = evaluate_model(model, stories, tokenizer, stride=args.stride, batch_size=args.batch_size,
                                max_stories=args.max_stories, progress=not args.no_progress)
        samples = None
        if args.samples:
            samples, _ = sample_quality(model, tokenizer, args.samples, max_new_tokens=args.sample_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        seed=args.seed, jit_compile=args.xla)
    except (DataError, EvaluationError) as exc:
        fail(str(exc))

    print(f"model {args.model or DEFAULT_MODEL} ({model.count_params():,} parameters, context "
          f"{scores['context']}) on {args.data} [{args.split}]: {scores['stories']} stories, "
          f"{scores['tokens']:,} tokens, {scores['bytes']:,} bytes, stride {scores['stride']}")
    print(f"loss {scores['loss']:.4f} nats/token | perplexity {scores['perplexity']:.3f} | "
          f"bits per byte {scores['bits_per_byte']:.4f} | {scores['tokens']:,} tokens")
    if samples is not None:
        print(f"samples: {samples['samples']} (temperature {args.temperature}, top-k {args.top_k}, top-p "
              f"{args.top_p}, seed {args.seed}, max {args.sample_tokens} tokens): distinct-1 "
              f"{samples['distinct_1']:.3f} | distinct-2 {samples['distinct_2']:.3f} | repetition rate "
              f"{samples['repetition_rate']:.3f} | ended with end-of-text {samples['eos_rate']:.1%}")
    if args.json:
        record = {
            "model": str(args.model or DEFAULT_MODEL),
            "data": args.data,
            "split": args.split,
            **scores,
            "samples": None if samples is None else {
                **samples, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.seed, "max_new_tokens": args.sample_tokens,
            },
        }
        atomic_write(args.json, (json.dumps(record, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
