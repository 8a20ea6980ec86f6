"""SentencePiece BPE tokenizer for TinyStories: training, the Python wrapper, and the in-graph form.

The settings make `decode(encode(text)) == text` for every Unicode string (without lone surrogates):

* `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`, `add_dummy_prefix=False`:
  no NFKC, no whitespace folding, no leading "▁" invented; spaces become "▁" and come back as spaces.
* `byte_fallback=True` with `character_coverage=1.0`: any character outside the vocabulary is
  spelled as UTF-8 byte pieces `<0x..>`, so nothing maps to `<unk>`.
* `"\\n"` is a user-defined piece (one token, never merged), so paragraphs survive as they are;
  `allow_whitespace_only_pieces=True` keeps runs of spaces; `split_digits=True` spells numbers digit by digit.
* SentencePiece itself would read a literal U+2581 "▁" in the text as a space. `Tokenizer.encode`
  spells that one character with its three byte pieces instead, which decode back to "▁".

Special ids: pad=0, unk=1, bos=2 ("<s>"), eos=3 ("<|endoftext|>", the end-of-text token).
The token stream of a corpus is `eos s1 eos s2 eos ...`.

CLI (training reads stories through tfgpt.data, so that command lives there; this module imports no
other tfgpt module but tfgpt.common):
    python -m tfgpt.data train-tokenizer --data data/tinystories --vocab-size 4096 --out tokenizer/
    python -m tfgpt.tokenizer encode --tokenizer tokenizer "Once upon a time"
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from tfgpt.common import EOT, atomic_write

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
META_FILE = "meta.json"

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MEMO_SIZE = 1 << 20  # words remembered by Tokenizer.encode_batch
_SEGMENT_RE = re.compile(r"\n| *[^ \n]+| +")
EOS_PIECE = EOT
SP_SPACE = "\u2581"  # SentencePiece's visible space "▁"

#: Trainer settings that make the tokenizer lossless on story text (see the module docstring).
TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "user_defined_symbols": ["\n"],
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_piece": "<pad>",
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": EOS_PIECE,
    "unk_surface": "",
    "max_sentence_length": 1 << 20,
    "hard_vocab_limit": True,
}


class TokenizerError(ValueError):
    """A tokenizer file or setting is unusable; the message says which and how to fix it."""


class Tokenizer:
    """A trained SentencePiece model with tfgpt's special ids.

    Example:
        >>> tok = Tokenizer.load("tokenizer/")
        >>> ids = tok.encode("Once upon a time")
        >>> tok.decode(ids)
        'Once upon a time'
    """

    def __init__(self, model_proto: bytes, path: str | Path | None = None) -> None:
        self.model_proto: bytes = bytes(model_proto)
        self.path: Path = Path(path) if path is not None else Path("<memory>")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except Exception:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise TokenizerError(
                f"{self.path} is not a SentencePiece model (it does not parse as one); "
                "train one with `python -m tfgpt.data train-tokenizer --data SOURCE --out DIR`"
            ) from None
        self.vocab_size: int = int(self._sp.GetPieceSize())
        self.pad_id: int = int(self._sp.pad_id())
        self.unk_id: int = int(self._sp.unk_id())
        self.bos_id: int = int(self._sp.bos_id())
        self.eos_id: int = int(self._sp.eos_id())
        if min(self.unk_id, self.eos_id) < 0:
            raise TokenizerError(
                f"{self.path} has no unk/eos pieces (unk={self.unk_id}, eos={self.eos_id}); "
                "retrain it with `python -m tfgpt.data train-tokenizer --data SOURCE --out DIR`"
            )
        self._special = frozenset(i for i in (self.pad_id, self.unk_id, self.bos_id, self.eos_id) if i >= 0)
        space_bytes = SP_SPACE.encode("utf-8")
        space_ids = [self._sp.PieceToId(f"<0x{b:02X}>") for b in space_bytes]
        # Without byte pieces a literal "▁" cannot be kept apart from a space; encode falls back to SP.
        self._space_ids: list[int] | None = space_ids if self.unk_id not in space_ids else None
        # Word-level memo for encode_batch (see there); only sound when no piece crosses a word boundary.
        self._memo: dict[str, list[int]] | None = {} if self._pieces_stay_in_words() else None

    def _pieces_stay_in_words(self) -> bool:
        """True when no piece has a space after a non-space or a newline beside other text.

        Then no BPE merge can cross the cut points of `_SEGMENT_RE` (before a run of spaces that follows
        a non-space, and around each newline), so encoding the segments one by one gives the ids of the
        whole text: SentencePiece's merges are local to the segment they happen in.
        """
        for i in range(self.vocab_size):
            if self._sp.IsControl(i) or self._sp.IsByte(i) or self._sp.IsUnknown(i):
                continue
            piece = self._sp.IdToPiece(i)
            if "\n" in piece and piece != "\n":
                return False
            if SP_SPACE in piece.lstrip(SP_SPACE):
                return False
        return True

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `path`: a directory holding `tokenizer.model`, or the `.model` file itself."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise TokenizerError(
                f"no tokenizer at {model_path}; pass a directory holding {MODEL_FILE} or the .model file "
                "(train one with `python -m tfgpt.data train-tokenizer --data SOURCE --out DIR`)"
            )
        return cls(model_path.read_bytes(), model_path)

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added). Every Unicode string encodes; decode inverts it."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if SP_SPACE in text and self._space_ids is not None:
            ids: list[int] = []
            for i, part in enumerate(text.split(SP_SPACE)):
                if i:
                    ids.extend(self._space_ids)
                if part:
                    ids.extend(self._sp.EncodeAsIds(part))
            return ids
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, the fast way: identical ids (tests check), quicker on stories
        (bench/data_throughput.py measures it).

        Each text is cut into words (`_SEGMENT_RE`: a word with the spaces before it, a run of trailing
        spaces, or a newline) and each distinct word is encoded by SentencePiece once and remembered
        (at most `MEMO_SIZE` words; the memo is emptied when full). Story text repeats its words a lot.
        """
        if self._memo is None:
            return [self.encode(t) for t in texts]
        out = []
        memo = self._memo
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
            ids: list[int] = []
            for segment in _SEGMENT_RE.findall(text):
                piece_ids = memo.get(segment)
                if piece_ids is None:
                    if len(memo) >= MEMO_SIZE:
                        memo.clear()
                    piece_ids = memo[segment] = self.encode(segment)
                ids.extend(piece_ids)
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. Special ids (pad/unk/bos/eos) and ids outside [0, vocab_size) are dropped."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special]
        return self._sp.DecodeIds(keep)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (e.g. "▁the", "<0x0A>", "<|endoftext|>")."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside [0, {self.vocab_size})")
        return self._sp.IdToPiece(int(token_id))

    @property
    def sha256(self) -> str:
        """Hash of the serialized model (identifies the tokenizer in caches and run configs)."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def tf_tokenizer(self):
        """The in-graph form: `tensorflow_text.SentencepieceTokenizer` built from `model_proto`.

        `tokenize(strings)` gives the same int32 ids as `encode` and `detokenize(ids)` the same text as
        `decode` for story text (tests check this); the one difference is that a literal "▁" in the
        input is read as a space in the graph. Specials are not stripped by `detokenize`.
        """
        import tensorflow as tf
        import tensorflow_text as tft

        return tft.SentencepieceTokenizer(model=self.model_proto, out_type=tf.int32, add_bos=False, add_eos=False)

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def __getstate__(self) -> dict[str, Any]:  # picklable for multiprocessing pools
        return {"model_proto": self.model_proto, "path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["path"])


# ---------------------------------------------------------------------- training
def train_tokenizer(
    stories: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    max_stories: int = 500_000,
    num_threads: int = 2,
    seed: int = 0,
    source: str | None = None,
) -> Tokenizer:
    """Train a byte-fallback SentencePiece BPE model on `stories` and write it to `out_dir`.

    Writes `tokenizer.model`, `tokenizer.vocab` and `meta.json` (settings, data, hash) atomically.
    At most `max_stories` stories are used (a uniform sample when there are more; SentencePiece's
    reservoir), which keeps memory bounded on the full 2 GB corpus.
    Raises TokenizerError for a vocab size the data cannot support, or no stories.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300 or vocab_size > 65535 * 4:
        raise TokenizerError(
            f"vocab size must be an integer >= 300 (256 byte pieces + specials + characters), got {vocab_size!r}"
        )
    out_dir = Path(out_dir)
    counter = _Counter(stories)
    model = io.BytesIO()
    settings = dict(TRAINER_SETTINGS)
    start = time.time()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(counter),
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=max_stories,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
            **settings,
        )
    except (RuntimeError, OSError) as exc:
        if counter.error is not None:  # the story source failed (e.g. a DataError): report that
            raise counter.error from None
        message = _sp_message(exc)
        if counter.count == 0:
            raise TokenizerError("no stories to train the tokenizer on; check --data") from None
        required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if required:
            raise TokenizerError(
                f"vocab size {vocab_size} is too small: byte fallback, the special pieces and the "
                f"characters of the data need {required.group(2)}; use --vocab-size >= {required.group(2)}"
            ) from None
        if "vocabulary size" in message.lower() or "vocab_size" in message.lower():
            raise TokenizerError(
                f"vocab size {vocab_size} is larger than the tokenizer can learn from "
                f"{counter.count} stories ({message}); use a smaller --vocab-size or more data"
            ) from None
        raise TokenizerError(f"SentencePiece training failed: {message}") from None
    seconds = time.time() - start
    if counter.count == 0:
        raise TokenizerError("no stories to train the tokenizer on; check --data")
    tokenizer = Tokenizer(model.getvalue(), out_dir / MODEL_FILE)
    # One piece per line; the newline piece is written as the two characters "\n".
    vocab_lines = "".join(
        f"{_escape(tokenizer._sp.IdToPiece(i))}\t{tokenizer._sp.GetScore(i):g}\n"
        for i in range(tokenizer.vocab_size)
    )
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "eos_piece": EOS_PIECE,
        "source": source,
        "stories_seen": counter.count,
        "bytes_seen": counter.bytes,
        "max_stories": max_stories,
        "seed": seed,
        "trainer_settings": settings,
        "sentencepiece_version": spm.__version__,
        "train_seconds": round(seconds, 2),
        "sha256": tokenizer.sha256,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / MODEL_FILE, tokenizer.model_proto)
    atomic_write(out_dir / VOCAB_FILE, vocab_lines.encode("utf-8"))
    atomic_write(out_dir / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=True) + "\n").encode())
    return tokenizer


class _Counter:
    """Iterates over stories once, counting them and their UTF-8 bytes, skipping empty ones."""

    def __init__(self, stories: Iterable[str]) -> None:
        self._stories = stories
        self.count = 0
        self.bytes = 0

        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for story in self._stories:
                if story:
                    self.count += 1
                    self.bytes += len(story.encode("utf-8"))
                    yield story
        except Exception as exc:  # SentencePiece would wrap it in a RuntimeError; keep the original
            self.error = exc
            raise


def _escape(piece: str) -> str:
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _sp_message(exc: BaseException) -> str:
    """The human part of a SentencePiece C++ error ("INTERNAL: src/x.cc(1) [check] message")."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if "] " in text:
        text = text.rsplit("] ", 1)[1].strip() or text
    return text.rstrip(".")


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfgpt.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["encode"], help="encode: print the ids and pieces of a text")
    parser.add_argument("--tokenizer", default="tokenizer")
    parser.add_argument("text")
    args = parser.parse_args(argv)
    try:
        tok = Tokenizer.load(args.tokenizer)
        ids = tok.encode(args.text)
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(ids)
    print([tok.id_to_piece(i) for i in ids])
    return 0

if __name__ == "__main__":
    sys.exit(main())
