"""tfgpt.tokenizer: lossless round trips, special ids, the in-graph tokenizer, training, errors, the CLI."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfgpt.common import REPO_ROOT
from tfgpt.data import load_stories
from tfgpt.tokenizer import EOS_PIECE, Tokenizer, TokenizerError, main, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "tokenizer"


@pytest.fixture(scope="session")
def shared_stories(tinystories_dir) -> dict[str, list[str]]:
    return {
        "train": list(load_stories(str(tinystories_dir), "train")),
        "validation": list(load_stories(str(tinystories_dir), "validation")),
    }


@pytest.fixture(scope="session")
def small_tok(shared_stories, tmp_path_factory) -> Tokenizer:
    """vocab 512 trained in the test on a slice of the shared train text."""
    return train_tokenizer(shared_stories["train"][:400], 512, tmp_path_factory.mktemp("tok512"))


@pytest.fixture(scope="session")
def committed_tok() -> Tokenizer:
    return Tokenizer.load(COMMITTED)


def test_round_trip_on_shared_tinystories(small_tok, committed_tok, shared_stories):
    stories = shared_stories["train"] + shared_stories["validation"]
    for tok in (small_tok, committed_tok):
        assert tok._memo is not None  # encode_batch takes its word-memo fast path
        encoded = tok.encode_batch(stories)
        assert [tok.decode(ids) for ids in encoded] == stories
        assert all(tok.unk_id not in ids for ids in encoded)
    # The fast path gives exactly SentencePiece's ids for the whole text.
    assert encoded == [committed_tok.encode(s) for s in stories]
    # A bigger vocabulary compresses better: fewer tokens for the same held-out text.
    valid = "\n".join(shared_stories["validation"])
    assert len(committed_tok.encode(valid)) < 0.8 * len(small_tok.encode(valid))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60) | st.text(alphabet=" \n\t\r▁ab.<|>", max_size=30) | st.text(alphabet="\n ", max_size=8))
def test_round_trip_on_arbitrary_unicode(small_tok, text):
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    assert small_tok.unk_id not in ids
    assert all(0 <= i < small_tok.vocab_size for i in ids)
    assert small_tok.encode_batch([text, "x", text]) == [ids, small_tok.encode("x"), ids]


def test_whitespace_newlines_and_specials(small_tok):
    tok = small_tok
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.id_to_piece(tok.eos_id) == EOS_PIECE == "<|endoftext|>"
    text = "  Two  spaces,\n\nthen\ttab and a trailing space "
    assert tok.decode(tok.encode(text)) == text
    newline = tok.encode("\n")
    assert len(newline) == 1 and tok.encode("a\nb").count(newline[0]) == 1
    # The end-of-text *text* is ordinary text: it never becomes the eos id.
    assert tok.eos_id not in tok.encode(f"The end.{EOS_PIECE}Next")
    assert tok.encode("2024") == [i for d in "2024" for i in tok.encode(d)]  # digits are split
    # decode drops special ids and ids outside the vocabulary.
    ids = tok.encode("Hello there.")
    noisy = [tok.eos_id, tok.bos_id, *ids[:1], tok.pad_id, -5, tok.vocab_size + 7, *ids[1:], tok.unk_id]
    assert tok.decode(noisy) == "Hello there."
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == "Hello there."


def test_tf_tokenizer_matches_python_side(committed_tok, shared_stories):
    import tensorflow as tf

    tok = committed_tok
    stories = shared_stories["validation"][:150] + ["  Odd  spacing\n\n end ", "café 日本 🙂", "", "x\r\ny"]
    graph = tok.tf_tokenizer()
    ragged = graph.tokenize(tf.constant(stories))
    assert ragged.dtype == tf.int32
    assert ragged.to_list() == tok.encode_batch(stories)
    texts = graph.detokenize(ragged).numpy()
    assert [t.decode("utf-8") for t in texts] == stories
    # Inside a tf.function (how the SavedModel uses it), one string at a time.
    fn = tf.function(lambda s: graph.tokenize(s), input_signature=[tf.TensorSpec([], tf.string)])
    assert fn(tf.constant(stories[0])).numpy().tolist() == tok.encode(stories[0])


def test_training_is_deterministic_and_writes_files(shared_stories, tmp_path, small_tok):
    tok = train_tokenizer(shared_stories["train"][:400], 512, tmp_path)
    assert tok.sha256 == small_tok.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "tokenizer.model", "tokenizer.vocab"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["stories_seen"] == 400 and meta["sha256"] == tok.sha256
    vocab = (tmp_path / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 512 and vocab[3].startswith(EOS_PIECE + "\t") and vocab[4].startswith("\\n\t")
    for path in (tmp_path, tmp_path / "tokenizer.model"):
        loaded = Tokenizer.load(path)
        assert loaded.sha256 == tok.sha256 and loaded.vocab_size == 512
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("Once upon a time") == tok.encode("Once upon a time")


def test_committed_tokenizer_matches_its_meta(committed_tok):
    meta = json.loads((COMMITTED / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256((COMMITTED / "tokenizer.model").read_bytes()).hexdigest()
    assert committed_tok.vocab_size == meta["vocab_size"]
    assert (COMMITTED / "tokenizer.vocab").read_text(encoding="utf-8").count("\n") == meta["vocab_size"]
    assert (COMMITTED / "README.md").is_file()


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)
    # the command the hint names exists: its --data/--out flags parse
    hint = re.search(r"`python -m (\S+) (\S+) --data SOURCE --out DIR`", str(e.value))
    assert hint is not None, str(e.value)
    proc = subprocess.run([sys.executable, "-m", hint[1], hint[2], "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--data" in proc.stdout and "--out" in proc.stdout, proc.stderr


def test_bad_training_requests(shared_stories, tmp_path):
    few = shared_stories["train"][:5]
    with pytest.raises(TokenizerError, match=r"vocab size 8000 is larger than the tokenizer can learn") as e:
        train_tokenizer(few, 8000, tmp_path / "big")
    assert "\n" not in str(e.value) and not (tmp_path / "big").exists()  # nothing half-written
    with pytest.raises(TokenizerError, match=r"too small.*--vocab-size >= \d+"):
        train_tokenizer(few, 300, tmp_path / "small")
    with pytest.raises(TokenizerError, match="no stories"):
        train_tokenizer(iter([]), 512, tmp_path / "none")
    with pytest.raises(TokenizerError, match="encode expects a str"):
        Tokenizer.load(COMMITTED).encode(b"bytes")  # type: ignore[arg-type]


def test_cli_encode(capsys):
    assert main(["encode", "--tokenizer", str(COMMITTED), "Once upon a time"]) == 0
    ids_line, pieces_line = capsys.readouterr().out.splitlines()
    assert eval(ids_line) == Tokenizer.load(COMMITTED).encode("Once upon a time")
    assert "▁upon" in pieces_line or "upon" in pieces_line
    assert main(["encode", "--tokenizer", str(COMMITTED.parent / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_tokenizer_imports_no_other_tfgpt_module():
    import ast

    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("tfgpt", "tokenizer.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in names if m.startswith("tfgpt")} <= {"tfgpt.common"}
