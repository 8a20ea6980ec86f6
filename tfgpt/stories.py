"""Stories in: where story text comes from and how it splits into train, dev and validation.

A *source* is one string (`--data SOURCE`), resolved like this:

1. an existing local path:
   * a text file `.txt`, `.txt.xz`, `.txt.gz` in either TinyStories layout: stories separated by lines
     reading `<|endoftext|>` (the raw `TinyStories-train.txt` layout; text after the last separator is a story
     too when it ends with a line break or closing punctuation, and a cut-off one, dropped, when it ends
     mid-sentence, as a file cut at a byte count does), or stories separated by blank lines;
   * a `.jsonl` (`.jsonl.gz`, `.jsonl.xz`) or `.parquet` file with a `text` column;
   * a directory written by `datasets.save_to_disk` (a Dataset or a DatasetDict);
   * a directory holding any of the files above (searched recursively). Files whose name contains
     "valid" (or is an HF `val`/`validation` shard) are the validation split, all others the train split;
2. anything else is a Hugging Face dataset id (default `roneneldan/TinyStories`), read with
   `datasets.load_dataset` (optionally streaming).

A story is one document: its text with surrounding whitespace stripped (inner whitespace and newlines are
kept as they are). Held-out split: the source's own validation split where it has one; otherwise stories go
to validation when `hash(story) < val_fraction` (blake2b), so the same story always lands on the same side.

Dev split (for choices made without touching the test set): with `dev_fraction` > 0 the train stories are
split once more by a second, independent hash: `dev` = train stories with `hash_dev(story) < dev_fraction`,
`train` = the rest. The validation split is then the untouched test set.

Train subsets (for data-scaling curves): with `train_fraction` < 1 the train split keeps only the stories with
`hash_subset(story) < train_fraction`, a third independent hash, so the 25 % subset lies inside the 50 % one
and the dev and validation splits are unchanged.

`tfgpt.story_files` reads the local files; `tfgpt.data` turns the stories of a split into tokens; this module
knows nothing of tokenizers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfgpt.common import BUNDLED_DATA, HF_SOURCE
from tfgpt.story_files import (  # noqa: F401  (DataError and the suffixes are re-exported)
    ALL_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    DataError,
    iter_file,
)

SPLITS = ("train", "dev", "validation", "all")
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "validation", "valid": "validation", "val": "validation",
                  "all": "all"}
_VALID_SPLIT_KEYS = ("validation", "valid", "val")


# =============================================================================================== sources
@dataclass
class ResolvedSource:
    """A source resolved for one split: how to iterate its stories and how to identify it for caching."""

    split: str
    description: str
    identity: dict[str, Any]
    iter_raw: Callable[[], Iterator[str]]  # stories of the chosen part (before the hash filter)
    hash_side: str | None = None  # "train"/"validation": keep only that side of the hash split
    val_fraction: float = 0.0
    dev_side: str | None = None  # "train"/"dev": keep only that side of the dev split of the train stories
    dev_fraction: float = 0.0
    train_fraction: float = 1.0  # < 1: keep only this hash-chosen fraction of the train stories


def load_stories(
    source: str = HF_SOURCE,
    split: str = "train",
    *,
    val_fraction: float = 0.05,
    dev_fraction: float = 0.0,
    train_fraction: float = 1.0,
    streaming: bool = False,
) -> Iterator[str]:
    """Iterate over the stories of `split` ("train", "dev", "validation" or "all") of `source`.

    See the module docstring for the source forms and the split rules ("dev" needs dev_fraction > 0,
    which also removes the dev stories from "train"; train_fraction < 1 keeps that fraction of "train"). Raises DataError (missing path, no stories,
    undecodable bytes with file and byte offset, unknown split, unreachable dataset).
    """
    resolved = resolve_source(source, split, val_fraction=val_fraction, dev_fraction=dev_fraction,
                              train_fraction=train_fraction, streaming=streaming)
    return iter_source(resolved)


def iter_source(resolved: ResolvedSource) -> Iterator[str]:
    count = 0
    for story in resolved.iter_raw():
        story = story.strip()
        if not story:
            continue
        if resolved.hash_side is not None and not on_side(story, resolved.hash_side, resolved.val_fraction):
            continue
        if resolved.dev_side is not None and not on_side(story, resolved.dev_side, resolved.dev_fraction, "dev"):
            continue
        if resolved.train_fraction < 1.0 and story_hash_fraction(story, "subset") >= resolved.train_fraction:
            continue
        count += 1
        yield story
    if count == 0:
        raise DataError(f"no stories found in the {resolved.split} split of {resolved.description}; "
                        "check the path/file contents (and --val-fraction for a source without a validation split)")


def story_hash_fraction(story: str, salt: str = "") -> float:
    """A stable number in [0, 1) from the story text (blake2b); < val_fraction means validation. A `salt`
    ("dev" for the dev split) gives an independent number for a second split."""
    digest = hashlib.blake2b(story.encode("utf-8"), digest_size=8, salt=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def on_side(story: str, side: str, fraction: float, held_out: str = "validation") -> bool:
    """The hash-split filter: whether `story` lies on `side` ("train", or `held_out`) of the split that sends
    the stories with hash(story) < fraction to `held_out` ("validation"; "dev", with its own salt "dev")."""
    salt = "" if held_out == "validation" else held_out
    return (story_hash_fraction(story, salt) < fraction) == (side == held_out)


def _normalise_split(split: str) -> str:
    key = _SPLIT_ALIASES.get(str(split).lower())
    if key is None:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return key


def _check_fraction(val_fraction: float) -> float:
    if not isinstance(val_fraction, int | float) or not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def looks_like_path(source: str) -> bool:
    """True for strings that cannot be a Hugging Face id (`name` or `owner/name`)."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return source.lower().endswith(ALL_SUFFIXES + (".xz", ".gz", ".json", ".arrow"))


def resolve_source(source: str, split: str, *, val_fraction: float, dev_fraction: float = 0.0,
                   train_fraction: float = 1.0, streaming: bool) -> ResolvedSource:
    split = _normalise_split(split)
    if not isinstance(train_fraction, int | float) or not 0.0 < float(train_fraction) <= 1.0:
        raise DataError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    resolved = _resolve_dev(source, split, val_fraction=val_fraction, dev_fraction=dev_fraction, streaming=streaming)
    if split == "train" and float(train_fraction) < 1.0:
        resolved.train_fraction = float(train_fraction)
        resolved.identity = {**resolved.identity, "train_fraction": float(train_fraction)}
    return resolved


def _resolve_dev(source: str, split: str, *, val_fraction: float, dev_fraction: float,
                 streaming: bool) -> ResolvedSource:
    if dev_fraction and not 0.0 < float(dev_fraction) < 1.0:
        raise DataError(f"dev_fraction must be in [0, 1), got {dev_fraction!r}")
    if split == "dev" and not dev_fraction:
        raise DataError("the dev split needs a dev fraction > 0 (e.g. --dev-fraction 0.05)")
    if split in ("train", "dev") and dev_fraction:
        resolved = _resolve_source(source, "train", val_fraction=val_fraction, streaming=streaming)
        resolved.split, resolved.dev_side, resolved.dev_fraction = split, split, float(dev_fraction)
        resolved.identity = {**resolved.identity, "dev_fraction": float(dev_fraction), "dev_side": split}
        return resolved
    return _resolve_source(source, split, val_fraction=val_fraction, streaming=streaming)


def _resolve_source(source: str, split: str, *, val_fraction: float, streaming: bool) -> ResolvedSource:
    if not isinstance(source, str | os.PathLike) or not str(source):
        raise DataError(f"data source must be a non-empty path or dataset id, got {source!r}")
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return _resolve_saved(path, split, val_fraction)
            return _resolve_files(path, _find_files(path), split, val_fraction, is_dir=True)
        return _resolve_files(path, [path], split, val_fraction, is_dir=False)
    if looks_like_path(source):
        raise DataError(f"data path {source} does not exist; pass an existing file/directory or a "
                        f"Hugging Face dataset id such as {HF_SOURCE}")
    return _resolve_hub(source, split, val_fraction, streaming)


def has_validation_split(source: str) -> bool:
    """Whether `source` has a validation split of its own (a file with "valid" in its name, a saved
    dataset's validation split). False means that its "validation" split is the hash-split side of its
    stories (`val_fraction` of them). A Hugging Face id counts as having one (checked when it is read)."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        return not looks_like_path(os.fspath(source))
    if path.is_file():
        return False
    if (path / "dataset_dict.json").is_file():
        keys = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return any(k in keys for k in _VALID_SPLIT_KEYS)
    if (path / "state.json").is_file():
        return False
    return any(_is_validation_file(p) for p in _find_files(path))


# ------------------------------------------------------------------------------------- local files
def _find_files(directory: Path) -> list[Path]:
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and p.name.lower().endswith(ALL_SUFFIXES)
    )
    if not files:
        raise DataError(f"no story files in {directory}; expected {', '.join(ALL_SUFFIXES)} files "
                        "or a directory written by datasets.save_to_disk")
    return files


def _is_validation_file(path: Path) -> bool:
    name = path.name.lower()
    return "valid" in name or re.match(r"^(val|dev)([-_.]|$)", name) is not None


def _file_identity(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _resolve_files(root: Path, files: list[Path], split: str, val_fraction: float, *, is_dir: bool) -> ResolvedSource:
    if not is_dir and not root.name.lower().endswith(ALL_SUFFIXES):
        raise DataError(f"{root}: unsupported file type; use one of {', '.join(ALL_SUFFIXES)} "
                        "or a directory of them")
    valid = [p for p in files if _is_validation_file(p)] if is_dir else []
    train = [p for p in files if p not in valid]
    if valid and split != "all":
        chosen = valid if split == "validation" else train
        if not chosen:
            raise DataError(f"{root} has no {split} files (files with 'valid' in the name are the "
                            "validation split, all others the train split)")
        rule: dict[str, Any] = {"rule": "files"}
        hash_side = None
    else:
        chosen = files
        hash_side = None if split == "all" else split
        rule = {"rule": "all"} if split == "all" else {"rule": "hash", "val_fraction": _check_fraction(val_fraction)}
    return ResolvedSource(
        split=split,
        description=str(root),
        identity={"kind": "files", "files": _file_identity(chosen), **rule},
        iter_raw=lambda: itertools.chain.from_iterable(iter_file(p) for p in chosen),
        hash_side=hash_side,
        val_fraction=val_fraction if hash_side else 0.0,
    )


# ------------------------------------------------------------------------------- datasets / the Hub
def _pick_splits(keys: list[str], split: str, source: str) -> tuple[str, str | None]:
    """(name of the split to read, hash side or None)."""
    valid_key = next((k for k in _VALID_SPLIT_KEYS if k in keys), None)
    train_key = "train" if "train" in keys else (keys[0] if len(keys) == 1 else None)
    if train_key is None:
        raise DataError(f"{source} has splits {keys}; expected a 'train' split")
    if split == "all":
        return train_key, None
    if valid_key is not None:
        return (valid_key if split == "validation" else train_key), None
    return train_key, split


def _dataset_stories(ds: Any, description: str) -> Iterator[str]:
    names = list(getattr(ds, "column_names", None) or [])
    if names and "text" not in names:
        raise DataError(f"{description} has no 'text' column (columns: {', '.join(names)})")
    if hasattr(ds, "iter") and hasattr(ds, "__len__"):  # map-style Dataset: read in Arrow batches
        for batch in ds.select_columns(["text"]).iter(batch_size=4096):
            yield from (t for t in batch["text"] if t is not None)
    else:
        for row in ds:
            text = row.get("text")
            if text is not None:
                yield text


def _resolve_saved(path: Path, split: str, val_fraction: float) -> ResolvedSource:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset ({exc})") from None
    keys = list(obj.keys()) if isinstance(obj, datasets.DatasetDict) else ["train"]
    key, hash_side = _pick_splits(keys, split, str(path))
    ds = obj[key] if isinstance(obj, datasets.DatasetDict) else obj
    if split == "all" and isinstance(obj, datasets.DatasetDict):
        parts = [obj[k] for k in keys]
        ds_iter: Callable[[], Iterator[str]] = lambda: itertools.chain.from_iterable(  # noqa: E731
            _dataset_stories(d, str(path)) for d in parts)
    else:
        ds_iter = lambda: _dataset_stories(ds, f"{path} [{key}]")  # noqa: E731
    files = sorted(p for p in path.rglob("*") if p.is_file())
    rule = {"rule": "hash", "val_fraction": _check_fraction(val_fraction)} if hash_side else {"rule": key}
    return ResolvedSource(
        split=split, description=str(path),
        identity={"kind": "saved", "files": _file_identity(files), "split_key": key, **rule},
        iter_raw=ds_iter, hash_side=hash_side, val_fraction=val_fraction if hash_side else 0.0,
    )


def _resolve_hub(source: str, split: str, val_fraction: float, streaming: bool) -> ResolvedSource:
    """A Hub dataset, opened lazily: the cache key (id, split, val_fraction) needs no network, so a
    cached token stream is used offline. Which split rule applies is known once the dataset is open."""
    val_fraction = _check_fraction(val_fraction)

    def stories() -> Iterator[str]:
        try:
            import datasets

            obj = datasets.load_dataset(source, streaming=streaming)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"{source!r} is not a local path and could not be loaded as a Hugging Face dataset "
                f"({type(exc).__name__}: {message[:200]}); check the id and your network, or use the "
                f"TinyStories sample that ships with tfgpt: --data {BUNDLED_DATA}"
            ) from None
        keys = list(obj.keys())
        key, hash_side = _pick_splits(keys, split, source)
        for part in [obj[k] for k in keys] if split == "all" else [obj[key]]:
            for story in _dataset_stories(part, f"{source} [{key}]"):
                if hash_side is None or on_side(story.strip(), hash_side, val_fraction):
                    yield story

    return ResolvedSource(
        split=split, description=f"Hugging Face dataset {source}",
        identity={"kind": "hub", "id": source, "split": split, "val_fraction": val_fraction},
        iter_raw=stories,
    )
