"""Small helpers shared by every module: constants, atomic file writes, file modes.

Importable without TensorFlow (like `tfgpt.config`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

#: The repository root (where `tokenizer/`, `runs/` and `data/` live in a checkout).
REPO_ROOT = Path(__file__).resolve().parents[1]

#: The end-of-text string: the story separator of the raw TinyStories files and the tokenizer's eos piece.
EOT = "<|endoftext|>"

#: The Hugging Face dataset id of TinyStories (needs internet).
HF_SOURCE = "roneneldan/TinyStories"

#: The TinyStories sample bundled with the repository (CDLA-Sharing-1.0; see its README.md): the offline default.
BUNDLED_DATA = "data/tinystories"

#: The run directory of the model that ships with the repository.
SHIPPED_RUN = "runs/shipped"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block succeeds, sync it to disk, give it the usual
    mode of a new file, rename it to `path` and sync the directory, so a reader (or a crash) never sees a
    half-written file. When the block raises, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        make_readable(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """`atomic_path` as an open binary file (closed before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` durably and atomically (`atomic_path`)."""
    with atomic_file(path) as f:
        f.write(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a directory on a filesystem that cannot sync one: the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (non-JSON values such as paths become strings)."""
    atomic_write(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def make_readable(path: str | Path) -> None:
    """Give a mkstemp file (mode 0600) the usual mode of a new file (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def repo_relative(path: str | Path) -> str:
    """`path` as recorded in JSON outputs: relative to the repository root when it lies inside it,
    otherwise as given (never an absolute path of this machine for a file of the repository)."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def source_revision(root: str | Path = REPO_ROOT) -> dict[str, Any] | None:
    """The git commit the code runs from, {"commit": sha, "dirty": tracked files edited}, recorded in a run's
    config.json so a model names the code that trained it; None outside a git checkout (or without git)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def replace_directory(tmp: str | Path, out_dir: str | Path) -> Path:
    """Move the finished directory `tmp` to `out_dir`, replacing any old one, never leaving `out_dir` half
    written (the old directory is moved aside first and removed after the rename)."""
    import shutil

    tmp, out_dir = Path(tmp), Path(out_dir)
    os.chmod(tmp, 0o755)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 (where C++ libraries log) to /dev/null for the block; Python exceptions still
    propagate, and Python's own stderr is flushed first."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++/absl start-up lines on stderr (oneDNN, CUDA stubs, cuInit), unless
    the user asked for them with TF_CPP_MIN_LOG_LEVEL=0 or 1 (absl prints the start-up lines even at level 3, so
    a higher level alone would not hide them). For command-line programs: call before anything imports
    TensorFlow. Python errors still raise as usual."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery logs (cuInit) happen here, not later
