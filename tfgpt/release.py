"""Release a trained run at half the size: `model.keras` and `saved_model/` with float16 weights.

    python -m tfgpt.release runs/shipped

Training writes float32 weights (exactly what it trained). For a release this rewrites the run's `model.keras`
with its float32 weights stored as float16 (Keras casts them back into the model's float32 variables on
load: `keras.models.load_model` gives the same model, every weight rounded to 11 significant bits, a relative
change of at most 2^-11 ≈ 4.9e-4; weights under 6.1e-5, float16's subnormals, change by less than 3e-8), then exports `saved_model/` from that file with float16 variables (cast
to float32 in the graph, `tfgpt.export`). Either way the model computes in float32 as before; only the
stored weights are rounded, so `model.keras` and the SavedModel stay the same model. config.json records
`release: {"weights_dtype": "float16", "command": ...}`. Run `evaluate.py` and `python -m tfgpt.samples` after
it, so eval.json and the sample sheet describe the weights that ship.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tfgpt.common import atomic_file, quiet_tensorflow, repo_relative

#: The weights file inside a `.keras` archive (Keras's own layout: config.json, metadata.json, this).
KERAS_WEIGHTS = "model.weights.h5"
#: The archive's group of optimizer state, kept in float32 (Adam's second moments underflow in float16).
OPTIMIZER_GROUP = "optimizer"
#: How a release stores the weights.
RELEASE_DTYPE = "float16"


class ReleaseError(ValueError):
    """A run cannot be released; the message says why and what to do."""


def store_weights_as(model_file: str | Path, dtype: str = RELEASE_DTYPE) -> int:
    """Rewrite the float32 weights inside the `.keras` file `model_file` as `dtype` (float16) and return how
    many arrays were rewritten (0 when they already are). Optimizer state, where the file holds any, stays
    float32, and the archive's other entries are copied unchanged; the
    new file replaces the old one only once it is complete. Raises ReleaseError for a file that is not a
    `.keras` archive or a weight that float16 cannot hold."""
    import h5py
    import numpy as np

    model_file = Path(model_file)
    if not zipfile.is_zipfile(model_file):
        raise ReleaseError(f"{model_file} is not a .keras archive; pass a run directory with a trained model.keras")
    with zipfile.ZipFile(model_file) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    if KERAS_WEIGHTS not in {info.filename for info, _ in entries}:
        raise ReleaseError(f"{model_file} holds no {KERAS_WEIGHTS}; it is not a Keras 3 model file")
    rewritten = 0
    limit = float(np.finfo(dtype).max)  # a weight beyond it would be stored as infinity

    def copy(source: h5py.Group, target: h5py.Group) -> None:
        nonlocal rewritten
        target.attrs.update(source.attrs)
        for name, item in source.items():
            if isinstance(item, h5py.Group):
                copy(item, target.create_group(name))
                continue
            data = item[()]
            is_weight = item.name.split("/")[1] != OPTIMIZER_GROUP
            if is_weight and isinstance(data, np.ndarray) and data.dtype == np.float32:
                if data.size and float(np.max(np.abs(data))) > limit:
                    raise ReleaseError(f"{model_file}: weight {item.name} exceeds the {dtype} range "
                                       f"(|w| > {limit:g}); this model cannot be released in {dtype}")
                data = data.astype(dtype)
                rewritten += 1
            target.create_dataset(name, data=data).attrs.update(item.attrs)

    weights = io.BytesIO()
    with h5py.File(io.BytesIO(dict((i.filename, d) for i, d in entries)[KERAS_WEIGHTS]), "r") as source, \
            h5py.File(weights, "w") as target:
        copy(source, target)
    if not rewritten:
        return 0
    with atomic_file(model_file) as f, zipfile.ZipFile(f, "w") as archive:
        for info, data in entries:
            archive.writestr(info, weights.getvalue() if info.filename == KERAS_WEIGHTS else data)
    return rewritten


def release(run_dir: str | Path, notify=print) -> Path:
    """Store the run's weights in float16: rewrite `run_dir/model.keras`, export `run_dir/saved_model` from it,
    record the release in config.json. Returns the SavedModel's path."""
    from tfgpt.export import export_saved_model
    from tfgpt.runs import RunError, load_model, read_run_config, write_run_file

    run_dir = Path(run_dir)
    config = read_run_config(run_dir) if run_dir.is_dir() else None
    if config is None or not (run_dir / "model.keras").is_file():
        raise ReleaseError(f"{run_dir} is not a trained run (it needs model.keras and config.json); "
                           "pass a run directory such as runs/shipped")
    size = (run_dir / "model.keras").stat().st_size
    n = store_weights_as(run_dir / "model.keras")
    notify(f"model.keras: {n} weight arrays stored as {RELEASE_DTYPE} "
           f"({size / 2**20:.1f} -> {(run_dir / 'model.keras').stat().st_size / 2**20:.1f} MiB)")
    try:
        model, tokenizer = load_model(run_dir)
    except RunError as exc:
        raise ReleaseError(str(exc)) from None
    out = export_saved_model(model, tokenizer, run_dir / "saved_model", RELEASE_DTYPE)
    saved = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    notify(f"saved_model/: exported with {RELEASE_DTYPE} variables ({saved / 2**20:.1f} MiB)")
    config["release"] = {"weights_dtype": RELEASE_DTYPE, "command": f"python -m tfgpt.release {repo_relative(run_dir)}"}
    write_run_file(run_dir, "config.json", config)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfgpt.release", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the run directory to release (model.keras + config.json), e.g. runs/shipped")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    try:
        release(args.run)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"the weights changed: re-run python evaluate.py --model {args.run} --json {Path(args.run) / 'eval.json'} "
          "(with the run's own settings) and python -m tfgpt.samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
