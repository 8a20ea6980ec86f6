"""SavedModel export: a GPT and its tokenizer as one TensorFlow graph that needs no tfgpt to run.

    python -m tfgpt.export --model runs/shipped --out exported/

Signatures:
  serving_default(token_ids int32 [batch, time]) -> {"logits": float32 [batch, time, vocab]}
  generate(prompts string [batch], max_new_tokens int32 [], temperature float32 [], top_k int32 [],
           top_p float32 [], seed int64 [])
      -> {"completions": string [batch], "token_ids": int32 [batch, max new] (−1 padded),
          "num_tokens": int32 [batch]}

`generate` tokenises in the graph (tensorflow_text SentencepieceTokenizer built from the tokenizer's
model proto), prepends the end-of-text token, keeps the last `context` prompt tokens, runs
`tfgpt.generation.Decoder` (the same cached tf.while_loop and default sampler as the Python API: temperature
0 = greedy, top_k 0 / top_p 1 = off, stop at end-of-text; the settings are checked by the same rules) and
detokenises the new tokens. Only the model's weights are saved (no optimizer state), as their own variables in
`weights_dtype` (`--weights-dtype float16` halves the files): the traced model reads them cast back to its own
dtype (through a `keras.StatelessScope`), so the graph computes in float32 either way. Loading:

    import tensorflow as tf, tensorflow_text  # noqa: F401  (registers the SentencePiece ops)
    m = tf.saved_model.load("exported/")
    out = m.signatures["generate"](prompts=tf.constant(["Once upon a time"]), max_new_tokens=tf.constant(100),
                                   temperature=tf.constant(0.8), top_k=tf.constant(0), top_p=tf.constant(0.95),
                                   seed=tf.constant(0, tf.int64))
    print(out["completions"][0].numpy().decode())
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfgpt.common import quiet_stderr, quiet_tensorflow, replace_directory

if __name__ == "__main__":  # `python -m tfgpt.export`: no C++ start-up lines before our own output
    quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfgpt.config import SAMPLING_RULES  # noqa: E402
from tfgpt.generation import Decoder  # noqa: E402

#: What `tf.saved_model.save` writes: the only entries a directory may hold for an export to replace it.
SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "variables", "assets", "assets.extra", "fingerprint.pb"})
#: How an export may store the model's floating-point weights (`--weights-dtype`).
WEIGHT_DTYPES = ("float32", "float16")


class ExportError(ValueError):
    """An export argument is invalid; the message says which and how to fix it."""


class GPTExport(tf.Module):
    """The exported module: the model's variables, the in-graph tokenizer and the two signatures."""

    def __init__(self, model: Any, tokenizer: Any, weights_dtype: str = "float32") -> None:
        super().__init__(name="tfgpt")
        # The module's own copies of the weights (not the Keras model, which would also drag in an optimizer),
        # floating-point ones stored as `weights_dtype`; the traced calls read them through `weights()`.
        self.model_variables = [
            tf.Variable(tf.cast(v.value, weights_dtype) if v.dtype.startswith("float") else v.value,
                        trainable=False, name=v.path)
            for v in model.variables
        ]
        pairs = list(zip(model.variables, self.model_variables, strict=True))

        def weights() -> keras.StatelessScope:
            """Inside this scope the model's variables read as the stored copies, cast to their own dtype."""
            return keras.StatelessScope(state_mapping=[(v, tf.cast(s, v.dtype)) for v, s in pairs])

        self.sp = tokenizer.tf_tokenizer()
        context = int(model.config.context)
        eos = int(tokenizer.eos_id)
        specials = tf.constant(sorted({i for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, eos)
                                       if i >= 0}), tf.int32)
        n_pieces = int(tokenizer.vocab_size)
        decoder = Decoder(model, use_cache=True)
        sp = self.sp

        def detokenize(ids: tf.RaggedTensor) -> tf.Tensor:
            keep = (ids >= 0) & (ids < n_pieces) & ~tf.reduce_any(ids[..., None] == specials, axis=-1)
            return sp.detokenize(tf.ragged.boolean_mask(ids, keep))

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
        def serve(token_ids):
            with weights():
                return {"logits": model(token_ids)}

        @tf.function(input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.float32, name="top_p"),
            tf.TensorSpec([], tf.int64, name="seed"),
        ])
        def generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
            given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
            checks = [tf.debugging.Assert(SAMPLING_RULES[name][1](value), [f"{name} {SAMPLING_RULES[name][2]}"])
                      for name, value in given.items()]  # the rules generate() and the command lines check
            with tf.control_dependencies(checks):
                ids = sp.tokenize(prompts)  # ragged (B, None) int32
            batch = tf.shape(prompts)[0]
            ids = tf.concat([tf.fill([batch, 1], eos), ids], axis=1)[:, -context:]  # [eos] + prompt, last T
            lengths = tf.cast(ids.row_lengths(), tf.int32)
            settings = decoder.settings(lengths, max_new_tokens, temperature, top_k, top_p, seed, eos)
            total = tf.reduce_max(lengths) + max_new_tokens
            with weights():
                buffer, n_new = decoder.run(ids.to_tensor(0), total, settings)
            positions = tf.range(tf.shape(buffer)[1])[None, :]
            is_new = (positions >= lengths[:, None]) & (positions < (lengths + n_new)[:, None])
            new_ids = tf.ragged.boolean_mask(buffer, is_new)
            # Decode prompt + completion together and cut the prompt's text off (keeps byte pieces whole).
            full = detokenize(tf.concat([ids, new_ids], axis=1))
            head = detokenize(ids)
            start = tf.strings.length(head)
            completions = tf.strings.substr(full, start, tf.strings.length(full) - start)
            return {"completions": completions, "token_ids": new_ids.to_tensor(-1), "num_tokens": n_new}

        self.serve = serve
        self.generate = generate


def check_export_dir(out_dir: str | Path) -> None:
    """Raise ExportError unless `out_dir` is new, an empty directory, or a SavedModel (which an export replaces):
    an export never deletes a user's files or a run directory."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a directory; name a new directory for the SavedModel")
    entries = {p.name for p in out_dir.iterdir()}
    if entries and not ("saved_model.pb" in entries and entries <= SAVED_MODEL_ENTRIES):
        others = ", ".join(sorted(entries - SAVED_MODEL_ENTRIES)[:3])
        raise ExportError(f"{out_dir} is not a SavedModel (it holds {others}) and would be replaced; "
                          "name a new or empty directory, or an old SavedModel to overwrite")


def export_saved_model(model: Any, tokenizer: Any, out_dir: str | Path, weights_dtype: str = "float32") -> Path:
    """Write `model` + `tokenizer` as a SavedModel directory `out_dir` and return it, the weights stored as
    `weights_dtype` (one of WEIGHT_DTYPES). A new or empty directory, or an old SavedModel, is replaced whole
    once the new one is written (the old one stays readable until then); anything else is refused with
    ExportError."""
    out_dir = Path(out_dir)
    if weights_dtype not in WEIGHT_DTYPES:
        raise ExportError(f"unknown weights dtype {weights_dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    limit = float(np.finfo(weights_dtype).max)  # a weight beyond it would be stored as infinity
    for v in model.variables:
        if v.dtype.startswith("float") and float(np.max(np.abs(np.asarray(v)))) > limit:
            raise ExportError(f"weight {v.path} exceeds the {weights_dtype} range (|w| > {limit:g}); "
                              "export it with --weights-dtype float32")
    check_export_dir(out_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ExportError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
            "export the model with the tokenizer it was trained with"
        )
    with quiet_stderr():  # building the in-graph SentencePiece op logs from C++ too
        module = GPTExport(model, tokenizer, weights_dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with quiet_stderr():  # tensorflow_text's SentencePiece logs "normalizer.cc ... LOG(INFO)" from C++
            tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve,
                                                              "generate": module.generate})
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfgpt.export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="run directory (model.keras + config.json) or .keras file")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir/.model (default: the run's)")
    parser.add_argument("--out", required=True, help="SavedModel directory to write")
    parser.add_argument("--weights-dtype", choices=WEIGHT_DTYPES, default="float32",
                        help="how to store the weights (float16: half the size; the graph computes in float32)")
    args = parser.parse_args(argv)

    from tfgpt.runs import RunError, load_model

    try:
        check_export_dir(args.out)
    except ExportError as exc:
        print(f"error: --out {exc}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model(args.model, args.tokenizer)
        path = export_saved_model(model, tokenizer, args.out, args.weights_dtype)
    except (RunError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (signatures: serving_default, generate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
