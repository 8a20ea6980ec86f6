"""Reading story files: the text, JSON-lines and parquet layouts of a local source (see `tfgpt.stories`).

A text file (`.txt`, `.txt.xz`, `.txt.gz`) holds stories separated by lines reading `<|endoftext|>` (the raw
`TinyStories-train.txt` layout) or by blank lines, told apart from its first 4 MiB; `.jsonl` and `.parquet`
files have a `text` column. Bytes that are not UTF-8 and truncated archives are a DataError naming the file
(and the byte offset). This module knows nothing of splits.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path

from tfgpt.common import EOT

TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_SNIFF_BYTES = 4 << 20  # how much of a text file is read to tell the two layouts apart


class DataError(ValueError):
    """A data source or pipeline setting is unusable; the message says which and how to fix it."""


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_file(path: Path) -> Iterator[str]:
    """The stories of one local file, by its suffix (parquet, JSON lines, else text)."""
    name = path.name.lower()
    try:
        if name.endswith(PARQUET_SUFFIXES):
            yield from _iter_parquet(path)
        elif name.endswith(JSONL_SUFFIXES):
            yield from _iter_jsonl(path)
        else:
            yield from _iter_text(path)
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated compressed file ({exc}); re-download or recompress it") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line with "\\n") of a possibly compressed UTF-8 file; CRLF becomes LF."""
    compressed = path.name.lower().endswith((".xz", ".gz"))
    offset = 0
    with _open_binary(path) as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = "of the decompressed text" if compressed else ""
                raise DataError(
                    f"{path}: invalid UTF-8 at byte offset {offset + exc.start} {where}".rstrip()
                    + "; convert the file to UTF-8"
                ) from None
            if offset == 0 and line.startswith("\ufeff"):
                line = line[1:]
            if line.endswith("\r\n"):
                line = line[:-2] + "\n"
            yield offset, line
            offset += len(raw)


def _iter_text(path: Path) -> Iterator[str]:
    """Stories of a text file, `<|endoftext|>` layout or blank-line layout (sniffed from the start)."""
    with _open_binary(path) as f:
        head = f.read(_SNIFF_BYTES)
    if not head.strip():
        raise DataError(f"{path} is empty; expected stories separated by {EOT} lines or blank lines")
    if EOT.encode() in head:
        yield from _iter_eot_layout(path)
    else:
        yield from _iter_blank_layout(path)


def _iter_eot_layout(path: Path) -> Iterator[str]:
    parts: list[str] = []
    for _, line in _iter_lines(path):
        if EOT in line:
            pieces = line.split(EOT)
            for piece in pieces[:-1]:
                parts.append(piece)
                yield "".join(parts)
                parts = []
            parts.append(pieces[-1])
        else:
            parts.append(line)
    tail = "".join(parts)
    if tail.strip() and _ends_whole(tail):  # a last story without a separator after it: scored too
        yield tail


def _ends_whole(text: str) -> bool:
    """Whether text after the last separator is a whole story: it ends with a line break or with closing
    punctuation. A file cut at a byte count (the bundled 2 MiB head) ends mid-sentence: that tail is dropped."""
    return text.endswith("\n") or text.rstrip().endswith((".", "!", "?", '"', "'", "\u201d", "\u2019"))


def _iter_blank_layout(path: Path) -> Iterator[str]:
    parts: list[str] = []
    for _, line in _iter_lines(path):
        if line.strip():
            parts.append(line)
        elif parts:
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)


def _iter_jsonl(path: Path) -> Iterator[str]:
    for lineno, (_, line) in enumerate(_iter_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        yield record["text"]


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text
