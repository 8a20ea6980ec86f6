"""tfgpt.data: every source layout yields the same stories, the hash split, the token cache, the windows."""

from __future__ import annotations

import gzip
import json
import lzma
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfgpt import token_cache as cache_module
from tfgpt.data import (
    DataError,
    epoch_order,
    load_stories,
    make_dataset,
    steps_per_epoch,
    story_hash_fraction,
    token_stream,
)
from tfgpt.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Invented stories (never dataset text): paragraphs on single newlines, curly quotes, accents, double spaces.
STORIES = [
    "Mira had a red kite.\nThe wind took it up high, and she laughed.",
    "A small frog sat on a leaf. “Hello, sun!” said the frog.\nThe sun smiled back.",
    "Tom baked a cake with his dad.  It was too sweet, but they ate it all.",
    "The café by the sea sold blue ice cream.\nZoë tried it and said it tasted like waves.\nShe came back the next day.",
    "Two ducks raced across the pond. The slow one won, because the fast one stopped to eat.",
    "Ben found a key under the mat.\nIt opened an old box full of buttons.",
    "A cloud wanted to be a sheep. It floated low over the farm, and the sheep said hello.",
    "Lia counted 12 stars, then 13, then she fell asleep.",
]
VALID = [
    "The moon lost its shoe. A cat found it and gave it back.",
    "Sam planted a bean.\nBy summer it was taller than the house.",
]
EOT = "<|endoftext|>"


def eot_text(stories: list[str], tail: str = "A cut-off sto", blank_after: bool = False) -> str:
    sep = f"\n{EOT}\n" + ("\n" if blank_after else "")
    return "".join(s + sep for s in stories) + tail


def blank_text(stories: list[str]) -> str:
    return "\n\n".join(stories) + "\n"


def write(path: Path, text: str) -> Path:
    raw = text.encode("utf-8")
    if path.name.endswith(".xz"):
        raw = lzma.compress(raw)
    elif path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


@pytest.fixture()
def tok(tmp_path_factory) -> Tokenizer:
    """A small tokenizer trained on the invented stories (256 byte pieces + specials + characters + merges)."""
    return train_tokenizer(STORIES * 3, 320, tmp_path_factory.mktemp("tok"))


# ================================================================================ layouts
@pytest.mark.parametrize(
    "name, text",
    [
        ("eot.txt", eot_text(STORIES)),
        ("eot_blank.txt", eot_text(STORIES, blank_after=True)),
        ("eot.txt.xz", eot_text(STORIES)),
        ("eot.txt.gz", eot_text(STORIES, tail="")),
        ("eot_crlf.txt", eot_text(STORIES).replace("\n", "\r\n")),
        ("eot_inline.txt", "".join(s + EOT for s in STORIES) + "tail"),
        ("blank.txt", blank_text(STORIES)),
        ("blank.txt.gz", "\n" + blank_text(STORIES) + "\n\n\n"),
        ("bom.txt", "\ufeff" + blank_text(STORIES)),
        ("stories.jsonl", "".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(STORIES))),
        ("stories.jsonl.xz", "".join(json.dumps({"text": s}) + "\n" for s in STORIES)),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "",
)
def test_text_and_jsonl_layouts_yield_the_stories(tmp_path, name, text):
    path = write(tmp_path / name, text)
    assert list(load_stories(str(path), "all")) == STORIES


def test_parquet_file_and_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": STORIES}).to_parquet(str(tmp_path / "one.parquet"))
    assert list(load_stories(str(tmp_path / "one.parquet"), "all")) == STORIES
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    datasets.Dataset.from_dict({"text": STORIES[:5]}).to_parquet(str(hub / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_dict({"text": STORIES[5:]}).to_parquet(str(hub / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_dict({"text": VALID}).to_parquet(str(hub / "validation-00000-of-00001.parquet"))
    assert list(load_stories(str(tmp_path / "hub"), "train")) == STORIES
    assert list(load_stories(str(tmp_path / "hub"), "validation")) == VALID


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": STORIES}), validation=datasets.Dataset.from_dict({"text": VALID})
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(load_stories(str(tmp_path / "dd"), "train")) == STORIES
    assert list(load_stories(str(tmp_path / "dd"), "validation")) == VALID
    datasets.Dataset.from_dict({"text": STORIES}).save_to_disk(str(tmp_path / "single"))
    assert list(load_stories(str(tmp_path / "single"), "all")) == STORIES
    train = list(load_stories(str(tmp_path / "single"), "train", val_fraction=0.3))
    valid = list(load_stories(str(tmp_path / "single"), "validation", val_fraction=0.3))
    assert sorted(train + valid) == sorted(STORIES) and not set(train) & set(valid)


def test_hub_id_goes_through_load_dataset(monkeypatch, tmp_path, tok):
    """The Hugging Face path (offline): load_dataset gets the id, its splits are used, and a cached token
    stream needs no second load (so it works offline)."""
    import datasets

    calls = []

    def fake_load_dataset(name, streaming=False, **kwargs):
        calls.append((name, streaming))
        parts = {"train": datasets.Dataset.from_dict({"text": STORIES})}
        if name == "someone/stories":
            parts["validation"] = datasets.Dataset.from_dict({"text": VALID})
        return datasets.DatasetDict(parts)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(load_stories("someone/stories", "train")) == STORIES
    assert list(load_stories("someone/stories", "validation", streaming=True)) == VALID
    assert calls == [("someone/stories", False), ("someone/stories", True)]
    # No validation split: the hash split of the train split.
    train = list(load_stories("someone/trainonly", "train", val_fraction=0.3))
    valid = list(load_stories("someone/trainonly", "validation", val_fraction=0.3))
    assert sorted(train + valid) == sorted(STORIES) and not set(train) & set(valid) and valid
    calls.clear()
    kw = {"cache_dir": tmp_path, "progress": False, "workers": 1}
    first = token_stream("someone/stories", tok, "validation", **kw)
    second = token_stream("someone/stories", tok, "validation", **kw)
    assert len(calls) == 1 and np.array_equal(first, second)
    assert token_stream("someone/stories", tok, "validation", **kw, with_info=True)[1]["stories"] == len(VALID)


def test_directory_of_text_files_splits_by_name(tmp_path):
    write(tmp_path / "Stories-train.part1.txt.xz", eot_text(STORIES[:4]))
    write(tmp_path / "Stories-train.part2.txt", blank_text(STORIES[4:]))
    write(tmp_path / "Stories-valid.txt.gz", eot_text(VALID, tail=""))
    (tmp_path / "notes.md").write_text("not a story file")
    assert list(load_stories(str(tmp_path), "train")) == STORIES
    assert list(load_stories(str(tmp_path), "valid")) == VALID
    assert list(load_stories(str(tmp_path), "all")) == STORIES + VALID


#: The bundled files: sha256 of the compressed file, sha256 of its text (as in data/tinystories/README.md), stories.
BUNDLED = {
    "TinyStories-train.head-2MiB.txt.xz": (
        "142f0147056a3b570f47c57a626fa726a68ca442df6e22c79d1c9b53d44d676e",
        "5352b299dcb1a32898b2d779b145b5a05f3e1265953fd21c264c9f9f9c9ae33d", 2316),
    "TinyStories-train.extra-sample.txt.xz": (
        "1563c7078565e9dcb53393ee927126b82025590dc42e8d995c2a5d2906dedde9",
        "d41d3941de804f8223e842a9a454ab5d2bf2d4b5f8e6e9109a1be1445f0fd809", 4655),
    "TinyStories-valid.head.txt.xz": (
        "acca5e22a81d7eb67a55c902a1a60e56ed0bed21e18a051f4a118e35e0833ec4",
        "ff92eb6b0b590dcd06fee563fd0ec8ad729a05d49d76598796230046c1722c5c", 589),
    "TinyStories-train.v2-gpt4-5M.txt.xz": (
        "ff2e397a0f4063ab9ab23cc46dda48e073c53e7d477a95ac74f0068813cede3a",
        "e0eb6c84ec40230a3f3669837d85095cfdcc756aa788f0a1ffcc99513b1de293", 6157),
    "TinyStories-train.v1-val-after-1000.txt.xz": (
        "f463d7fa4625bf01e4b37b690f78530121625a872aaf8e6138436ba964a6b556",
        "d8245d4a1d68f9d2d7b1852a6a5c6a00af6a575423ac0f264bb5cf5a0a6052de", 7506),
}


def test_bundled_files_are_the_recorded_bytes(tinystories_dir):
    import hashlib
    import lzma

    assert sorted(p.name for p in tinystories_dir.glob("*.xz")) == sorted(BUNDLED)
    for name, (xz_sha, text_sha, stories) in BUNDLED.items():
        packed = (tinystories_dir / name).read_bytes()
        text = lzma.decompress(packed)
        assert hashlib.sha256(packed).hexdigest() == xz_sha, name
        assert hashlib.sha256(text).hexdigest() == text_sha, name
        assert text.count(b"\n<|endoftext|>\n") + text.startswith(b"<|endoftext|>\n") == stories, name
    readme = (tinystories_dir / "README.md").read_text()
    assert "CDLA-Sharing-1.0" in readme and "Eldan" in readme
    assert all(text_sha in readme for _, text_sha, _ in BUNDLED.values())


def test_bundled_tinystories_directory(tinystories_dir):
    train = list(load_stories(str(tinystories_dir), "train"))
    valid = list(load_stories(str(tinystories_dir), "validation"))
    # counts from the data README: 2,316 + 4,655 + 6,157 + 7,506 train (the cut-off tail of the head is dropped),
    # 589 valid
    assert len(train) == 2316 + 4655 + 6157 + 7506 == 20634 and len(valid) == 589
    assert len(set(train)) == len(train) and not set(train) & set(valid)
    assert any(s.startswith("One day, a little girl named Lily found a needle") for s in train)
    assert valid[0].startswith("Spot. Spot saw the shiny car")
    assert all(EOT not in s and s == s.strip() and s for s in train + valid)
    assert sum("\n" in s for s in train) > 1000  # paragraphs kept inside stories


# ================================================================================ hash split
def test_hash_split_is_stable_and_disjoint(tmp_path):
    stories = [f"Story number {i}: a bird named Pip flew {i % 7} times around the tree." for i in range(400)]
    path = write(tmp_path / "many.txt", blank_text(stories))
    train = list(load_stories(str(path), "train", val_fraction=0.1))
    valid = list(load_stories(str(path), "validation", val_fraction=0.1))
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(stories)
    assert 20 <= len(valid) <= 60  # ~10 % of 400
    assert all(story_hash_fraction(s) < 0.1 for s in valid)
    # The side depends only on the story text: another file, another order, same sides.
    other = write(tmp_path / "other.txt.gz", eot_text(stories[::-1][:150], tail=""))
    assert set(load_stories(str(other), "validation", val_fraction=0.1)) == set(valid) & set(stories[::-1][:150])
    assert list(load_stories(str(path), "validation", val_fraction=0.1)) == valid


def test_dev_split_is_carved_from_train_only(tinystories_dir, tmp_path):
    src = str(tinystories_dir)
    train_all = list(load_stories(src, "train"))
    train = list(load_stories(src, "train", dev_fraction=0.05))
    dev = list(load_stories(src, "dev", dev_fraction=0.05))
    valid = list(load_stories(src, "validation", dev_fraction=0.05))
    assert not set(train) & set(dev) and sorted(train + dev) == sorted(train_all)
    assert 0.035 * len(train_all) < len(dev) < 0.065 * len(train_all)  # ~5 % of 20,634
    assert valid == list(load_stories(src, "validation"))  # the test set is untouched
    assert all(story_hash_fraction(s, "dev") < 0.05 for s in dev)
    assert all(story_hash_fraction(t, "dev") >= 0.05 for t in train)
    # independent of the validation hash: on a file without a validation split the three sides are disjoint
    stories = [f"Story {i}: a cat named Tom ran {i % 9} laps." for i in range(600)]
    path = write(tmp_path / "many.txt", blank_text(stories))
    sides = {split: set(load_stories(str(path), split, val_fraction=0.1, dev_fraction=0.1))
             for split in ("train", "dev", "validation")}
    assert sum(map(len, sides.values())) == 600 and set().union(*sides.values()) == set(stories)
    assert 30 <= len(sides["dev"]) <= 80
    with pytest.raises(DataError, match="dev split needs a dev fraction"):
        list(load_stories(src, "dev"))


def test_train_fraction_keeps_nested_hash_chosen_subsets_of_train_only(tmp_path, tok):
    stories = [f"Story {i}: a frog named Max hopped {i % 11} times." for i in range(800)]
    path = str(write(tmp_path / "many.txt", blank_text(stories)))
    kw = {"val_fraction": 0.1, "dev_fraction": 0.1}
    train = list(load_stories(path, "train", **kw))
    quarter = list(load_stories(path, "train", train_fraction=0.25, **kw))
    half = list(load_stories(path, "train", train_fraction=0.5, **kw))
    assert set(quarter) < set(half) < set(train)  # nested
    assert 0.18 * len(train) < len(quarter) < 0.32 * len(train) and 0.42 * len(train) < len(half) < 0.58 * len(train)
    assert [s for s in train if story_hash_fraction(s, "subset") < 0.25] == quarter  # order kept
    for split in ("dev", "validation"):  # the held-out sides do not shrink
        assert list(load_stories(path, split, train_fraction=0.25, **kw)) == list(load_stories(path, split, **kw))
    # independent of the dev hash: dev stories are not the ones the subset drops
    assert abs(sum(story_hash_fraction(s, "subset") < 0.5 for s in stories) / 800 - 0.5) < 0.06
    ckw = {"cache_dir": tmp_path / "cache", "workers": 1, "progress": False, **kw}
    full_info = token_stream(path, tok, "train", **ckw, with_info=True)[1]
    quarter_info = token_stream(path, tok, "train", train_fraction=0.25, **ckw, with_info=True)[1]
    assert full_info["key"] != quarter_info["key"] and quarter_info["stories"] == len(quarter)
    assert token_stream(path, tok, "train", train_fraction=1.0, **ckw, with_info=True)[1]["key"] == full_info["key"]
    with pytest.raises(DataError, match=r"train_fraction must be in \(0, 1\], got 0"):
        list(load_stories(path, "train", train_fraction=0))


def test_dev_split_token_streams_are_cached_separately(tmp_path, tok):
    stories = [f"Story {i}: Mia saw {i % 5} red birds." for i in range(300)]
    path = str(write(tmp_path / "s.txt", blank_text(stories)))
    kw = {"cache_dir": tmp_path / "cache", "workers": 1, "progress": False, "val_fraction": 0.1}
    full = token_stream(path, tok, "train", **kw, with_info=True)[1]
    train = token_stream(path, tok, "train", dev_fraction=0.2, **kw, with_info=True)[1]
    dev = token_stream(path, tok, "dev", dev_fraction=0.2, **kw, with_info=True)[1]
    assert len({full["key"], train["key"], dev["key"]}) == 3
    assert train["stories"] + dev["stories"] == full["stories"]
    assert train["tokens"] + dev["tokens"] == full["tokens"] + 1  # each stream starts with one eos


# ================================================================================ token cache
def test_token_stream_layout_and_cache(tmp_path, tok, monkeypatch):
    path = write(tmp_path / "s.txt", blank_text(STORIES))
    cache = tmp_path / "cache"
    tokens = token_stream(str(path), tok, "all", cache_dir=cache, workers=1, progress=False)
    expected = [tok.eos_id]
    for s in STORIES:
        expected += tok.encode(s) + [tok.eos_id]
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, expected)
    info = token_stream(str(path), tok, "all", cache_dir=cache, progress=False, with_info=True)[1]
    assert info["tokens"] == len(expected) and info["stories"] == len(STORIES)
    assert info["bytes"] == sum(len(s.encode()) for s in STORIES)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("cache miss: the stream was tokenised again")

    monkeypatch.setattr(cache_module, "_write_stream", no_tokenising)
    again = token_stream(str(path), tok, "all", cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again, tokens)
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]  # no temp files left behind


def test_cache_key_changes_with_tokenizer_split_and_file(tmp_path, tok):
    path = write(tmp_path / "s.txt", blank_text(STORIES))
    other_tok = train_tokenizer(STORIES * 3, 340, tmp_path / "tok2")
    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "progress": False, "workers": 1}
    a = token_stream(str(path), tok, "train", val_fraction=0.3, **kw, with_info=True)[1]
    b = token_stream(str(path), other_tok, "train", val_fraction=0.3, **kw, with_info=True)[1]
    c = token_stream(str(path), tok, "train", val_fraction=0.5, **kw, with_info=True)[1]
    d = token_stream(str(path), tok, "validation", val_fraction=0.3, **kw, with_info=True)[1]
    assert len({a["key"], b["key"], c["key"], d["key"]}) == 4
    write(path, blank_text(STORIES[:3]))  # new size and mtime: a new key, new tokens
    e = token_stream(str(path), tok, "all", **kw, with_info=True)[1]
    assert e["stories"] == 3


def test_parallel_tokenising_matches_serial(tmp_path, tok, monkeypatch):
    path = write(tmp_path / "s.txt", blank_text(STORIES * 200))
    chunks = cache_module._chunks
    monkeypatch.setattr(cache_module, "_chunks", lambda stories: chunks(stories, max_chars=2000))  # many chunks
    serial = token_stream(str(path), tok, "all", cache_dir=tmp_path / "c1", workers=1, progress=False)
    parallel = token_stream(str(path), tok, "all", cache_dir=tmp_path / "c2", workers=2, progress=False)
    np.testing.assert_array_equal(serial, parallel)
    assert len(serial) == 1 + 200 * sum(len(tok.encode(s)) + 1 for s in STORIES)


# ================================================================================ windows
def batches(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(ds.as_numpy_iterator())


def test_windows_are_shifted_and_inside_the_stream():
    tokens = np.arange(1003, dtype=np.uint16)  # token value == its position
    context, batch = 16, 4
    out = batches(make_dataset(tokens, context, batch, seed=3))
    assert len(out) == steps_per_epoch(tokens, context, batch) == (1002 // 16) // 4
    assert int(make_dataset(tokens, context, batch, skip_batches=2).cardinality()) == len(out) - 2
    assert make_dataset(tokens, context, batch, repeat=True).cardinality() == tf.data.INFINITE_CARDINALITY
    for x, y in out:
        assert x.dtype == np.int32 and x.shape == (batch, context) == y.shape
        np.testing.assert_array_equal(y, x + 1)  # targets are the inputs shifted by one
        assert (x[:, 0] % context == 0).all()  # windows start at k * context
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(context))
        assert y.max() < len(tokens)


def test_every_token_once_per_epoch_and_seeded_order():
    tokens = np.arange(1000, dtype=np.uint16)
    context = 10
    n_windows = (len(tokens) - 1) // context
    full = batches(make_dataset(tokens, context, 7, seed=5, drop_remainder=False))
    seen = np.concatenate([x.ravel() for x, _ in full])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n_windows * context))
    assert full[-1][0].shape[0] == n_windows % 7
    same = batches(make_dataset(tokens, context, 7, seed=5, drop_remainder=False))
    assert all((a[0] == b[0]).all() for a, b in zip(full, same, strict=True))
    other_seed = batches(make_dataset(tokens, context, 7, seed=6, drop_remainder=False))
    assert not all((a[0] == b[0]).all() for a, b in zip(full, other_seed, strict=True))
    unshuffled = batches(make_dataset(tokens, context, 7, shuffle=False))
    np.testing.assert_array_equal(unshuffled[0][0][:, 0], np.arange(7) * context)


def test_epochs_repeat_skip_and_resume():
    tokens = np.arange(2000, dtype=np.uint16)
    context, batch = 8, 16
    steps = steps_per_epoch(tokens, context, batch)
    stream = batches(make_dataset(tokens, context, batch, seed=1, repeat=True).take(3 * steps))
    starts = [x[:, 0] for x, _ in stream]
    epoch0, epoch1 = np.concatenate(starts[:steps]), np.concatenate(starts[steps : 2 * steps])
    assert not np.array_equal(epoch0, epoch1)  # epoch e+1 is ordered differently
    np.testing.assert_array_equal(epoch0 // context, epoch_order(249, 1, 0)[: steps * batch])
    one = batches(make_dataset(tokens, context, batch, seed=1, first_epoch=1))
    np.testing.assert_array_equal(np.concatenate([x[:, 0] for x, _ in one]), epoch1)
    # skip_batches gives exactly the tail of the un-skipped epoch, then goes on with the next epochs.
    skipped = batches(make_dataset(tokens, context, batch, seed=1, skip_batches=5, repeat=True).take(2 * steps - 5))
    for (xa, ya), (xb, yb) in zip(stream[5 : 2 * steps], skipped, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    resumed = batches(make_dataset(tokens, context, batch, seed=1, skip_batches=steps + 2).take(3))
    np.testing.assert_array_equal(resumed[0][0], stream[steps + 2][0])


def test_memmap_input(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = next(iter(make_dataset(tokens, 32, 8, seed=0)))
    np.testing.assert_array_equal(y.numpy(), x.numpy() + 1)


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    """experimental_distribute_dataset splits each global batch across 2 replicas (run in a subprocess:
    logical devices must be configured before TensorFlow initialises)."""
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from tfgpt.data import make_dataset
        tokens = np.arange(4000, dtype=np.uint16)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        ds = make_dataset(tokens, 16, 8, seed=2)
        dist = strategy.experimental_distribute_dataset(ds)
        ref = next(iter(ds))
        x, y = next(iter(dist))
        parts = strategy.experimental_local_results(x)
        assert strategy.num_replicas_in_sync == 2 and [p.shape[0] for p in parts] == [4, 4], parts
        np.testing.assert_array_equal(np.concatenate([p.numpy() for p in parts]), ref[0].numpy())
        @tf.function
        def step(x, y):
            return strategy.run(lambda a, b: tf.reduce_sum(tf.cast(b - a, tf.int64)), args=(x, y))
        total = strategy.reduce("SUM", step(x, y), axis=None)
        assert int(total) == 8 * 16, int(total)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ================================================================================ bad input
def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_stories(str(tmp_path / "nope.txt"))
    one_line_error(e)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", b"", "is empty"),
        ("spaces.txt", b"  \n\n \n", "is empty"),
        ("only_tail.txt", b"A story that never ends", None),
        ("only_cut.txt", f"{EOT}\nthe rest was cut".encode(), "no stories found"),
    ],
)
def test_empty_or_storyless_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    if match is None:  # a blank-line file's last story is complete
        assert list(load_stories(str(path), "all")) == ["A story that never ends"]
        return
    with pytest.raises(DataError, match=match) as e:
        list(load_stories(str(path), "all"))
    one_line_error(e)


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    good = b"Line one of a story.\nLine two.\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(good + b"caf\xe9 au lait\n\n" + b"Another story.\n")
    with pytest.raises(DataError, match=rf"bad.txt: invalid UTF-8 at byte offset {len(good) + 3}\b") as e:
        list(load_stories(str(path), "all"))
    one_line_error(e)
    xz = tmp_path / "bad.txt.xz"
    xz.write_bytes(lzma.compress(path.read_bytes()))
    with pytest.raises(DataError, match=rf"offset {len(good) + 3} of the decompressed text"):
        list(load_stories(str(xz), "all"))


def test_other_bad_sources(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_stories(str(tmp_path / "a.csv"))
    with pytest.raises(DataError, match="no story files"):
        load_stories(str(tmp_path))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"story": "no text key"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: expected an object with a string 'text' field"):
        list(load_stories(str(tmp_path / "b.jsonl"), "all"))
    (tmp_path / "c.txt.xz").write_bytes(b"not xz at all")
    with pytest.raises(DataError, match="corrupt or truncated compressed file"):
        list(load_stories(str(tmp_path / "c.txt.xz"), "all"))
    write(tmp_path / "d.txt", blank_text(STORIES))
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_stories(str(tmp_path / "d.txt"), "test")
    with pytest.raises(DataError, match="val_fraction must be in"):
        load_stories(str(tmp_path / "d.txt"), "train", val_fraction=1.5)


def test_bad_pipeline_arguments():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(DataError, match="too short for one window"):
        make_dataset(tokens, 128, 2)
    with pytest.raises(DataError, match="fewer than batch_size"):
        make_dataset(tokens, 16, 64)
    with pytest.raises(DataError, match="context must be a positive integer"):
        make_dataset(tokens, 0, 2)
    with pytest.raises(DataError, match="skip_batches must be a non-negative"):
        make_dataset(tokens, 8, 2, skip_batches=-1)


def test_cli_train_tokenizer_and_errors(tmp_path, capsys):
    from tfgpt.data import main
    from tfgpt.tokenizer import Tokenizer

    data = tmp_path / "stories-train.txt"
    data.write_text("".join(f"Story {i}: Nia fed the {i % 5} ducks and went home.\n<|endoftext|>\n" for i in range(300)))
    out = tmp_path / "tok"
    assert main(["train-tokenizer", "--data", str(data), "--vocab-size", "300", "--out", str(out)]) == 0
    assert Tokenizer.load(out).vocab_size == 300
    assert "wrote" in capsys.readouterr().out
    broken = tmp_path / "broken-train.txt"
    broken.write_bytes(data.read_bytes() + b"Story \xff\n<|endoftext|>\n")
    bad_cases = [
        (["train-tokenizer", "--data", str(broken), "--out", str(tmp_path / "z")], f"invalid UTF-8 at byte offset {data.stat().st_size + 6}"),
        (["train-tokenizer", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")], "does not exist"),
        (["train-tokenizer", "--data", str(data), "--vocab-size", "50000", "--out", str(tmp_path / "y")], "larger than"),
        (["tokenize", "--tokenizer", str(data), "--data", str(data)], "is not a SentencePiece model"),
    ]
    for argv, needle in bad_cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not any((tmp_path / d).exists() for d in "xyz")  # nothing half-written
