"""`TrainConfig`: every setting of a training run, checked; and how the command line's flags, `--config` and
`--resume` combine into one. Importable without TensorFlow, so bad input fails in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfgpt.common import BUNDLED_DATA, HF_SOURCE, repo_relative
from tfgpt.config import PRESETS, ConfigError, GPTConfig
from tfgpt.runs import RunError, read_run_config
from tfgpt.stories import looks_like_path

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")

#: The warm-up of a run of at least 10·DEFAULT_WARMUP steps when --warmup is not given; shorter runs warm up
#: for 10 % of their steps.
DEFAULT_WARMUP = 100

#: TrainConfig fields that do not change what is trained; they may differ when a run is resumed.
RUN_CONTROL_FIELDS = frozenset(
    {"time_budget", "run_name", "logdir", "out", "verbose", "log_every", "backup_every", "cache_dir", "export"}
)
#: TrainConfig fields that hold paths: recorded in JSON relative to the repository (`repo_relative`).
#: GPTConfig fields a run may override (None = the preset's).
MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "norm_position", "position_encoding")
#: Settings added after runs were recorded, with the value that means "as before" (left out of identity()).
NEWER_FIELDS: dict[str, Any] = {**dict.fromkeys(MODEL_FIELDS), "train_fraction": 1.0}
PATH_FIELDS = ("data", "val_data", "tokenizer", "logdir", "out", "cache_dir")


class TrainingError(RuntimeError):
    """Training stopped abnormally (e.g. the loss became NaN); the message says what to do."""


class TrainConfigError(ConfigError):
    """A training setting, path or resume request is invalid; the message names it and the fix."""


@dataclass
class TrainConfig:
    """Everything `train` needs; every field is a `train_keras.py` flag of the same name.

    Attributes:
        preset: model preset (`tfgpt.config.PRESETS`); its vocab size is replaced by the tokenizer's.
        data: story source for `tfgpt.data` (HF dataset id, local dataset dir, or text file(s)).
        val_data: separate validation source; None = the validation split of `data`.
        tokenizer: directory holding tokenizer.model (or the .model file).
        epochs: passes over the training tokens.
        max_steps: stop after this many optimizer steps in total (the schedule then ends there).
        time_budget: wall-clock seconds for this invocation; when spent, training stops cleanly,
            backs up, and the run is finished (metrics, best model, export). Rerun to continue.
        batch_size: B, global batch size (split over replicas).
        context: T, tokens per training window; None = the preset's context.
        lr: peak learning rate; min_lr_ratio: final lr / peak lr.
        warmup: linear warm-up steps; None = `DEFAULT_WARMUP`, or 10 % of a run shorter than 10x that.
        weight_decay: AdamW decoupled weight decay, applied to weight matrices only.
        beta1, beta2: Adam moment decay rates; clipnorm: global gradient-norm clip.
        dropout: overrides the preset's dropout when not None.
        d_model, n_layers, n_heads, norm_position, position_encoding: override the preset's (`GPTConfig`)
            when not None, so a sweep or an ablation needs no new preset.
        train_fraction: < 1 trains on this hash-chosen fraction of the train stories (tfgpt.stories; nested:
            the 25 % subset lies inside the 50 % one), for data-scaling curves; dev/validation unchanged.
        precision: Keras dtype policy, or "auto" (GPU/TPU: mixed_bfloat16, older GPUs mixed_float16,
            CPU: `tfgpt.training.strategy.CPU_AUTO_PRECISION`).
        xla: `jit_compile` for the train step; None = auto (on for GPU/TPU, `CPU_AUTO_XLA` on CPU).
        strategy: "auto" (TPU if present, multiworker under a TF_CONFIG cluster, mirrored over >1 GPU,
            else default), "default", "mirrored" (all local GPUs, or logical CPU devices), "multiworker"
            (TF_CONFIG), "tpu".
        run_name: runs/<run_name>; None = "<preset>-<hash of the settings>", so rerunning the same
            command finds the same run and resumes it.
        logdir / out: roots of the TensorBoard logs and of the run directories.
        seed: initialisation, data order and dropout seed.
        log_every: steps between TensorBoard train scalars (and NaN checks).
        backup_every: steps between resumable backups (also at every epoch end).
        val_steps: validation batches per evaluation (None = the whole validation split).
        sample_tokens: tokens per sampled story at each epoch end (0 = no samples).
        patience: stop when the validation loss has not improved for this many epochs (None = off).
        val_fraction: held-out fraction when `data` has no validation split.
        dev_fraction: > 0 carves a dev split of this fraction from the train stories (tfgpt.data, a second
            hash): the run trains on the rest and validates on the dev stories (best checkpoint, patience),
            so the source's validation split stays an untouched test set. 0 = validate on `val_data` or the
            validation split of `data`.
        cache_dir: token cache directory (tfgpt.data.token_stream).
        verbose: Keras progress bar: 0 silent, 1 bar, 2 one line per epoch, "auto".
        export: write runs/<run>/saved_model at the end.
    """

    preset: str = "cpu-small"
    data: str = HF_SOURCE
    val_data: str | None = None
    tokenizer: str = "tokenizer"
    epochs: int = 5
    max_steps: int | None = None
    time_budget: float | None = None
    batch_size: int = 32
    context: int | None = None
    lr: float = 1e-3
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clipnorm: float = 1.0
    dropout: float | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    norm_position: str | None = None
    position_encoding: str | None = None
    train_fraction: float = 1.0
    precision: str = "auto"
    xla: bool | None = None
    strategy: str = "auto"
    run_name: str | None = None
    logdir: str = "logs"
    out: str = "runs"
    seed: int = 1337
    log_every: int = 20
    backup_every: int = 200
    val_steps: int | None = None
    sample_tokens: int = 128
    patience: int | None = None
    val_fraction: float = 0.05
    dev_fraction: float = 0.0
    cache_dir: str = ".cache/tokens"
    verbose: int | str = "auto"
    export: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into config.json

    def __post_init__(self) -> None:
        for name, minimum, optional in (
            ("epochs", 1, False), ("max_steps", 1, True), ("batch_size", 1, False), ("context", 1, True),
            ("warmup", 0, True), ("log_every", 1, False), ("backup_every", 1, False), ("val_steps", 1, True),
            ("sample_tokens", 0, False), ("patience", 1, True), ("seed", 0, False),
            ("d_model", 1, True), ("n_layers", 1, True), ("n_heads", 1, True),
        ):  # fmt: skip
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise TrainConfigError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")
        if self.preset not in PRESETS:
            raise TrainConfigError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        limit = PRESETS[self.preset].context
        if self.context is not None and self.context > limit:
            raise TrainConfigError(f"--context {self.context} is larger than preset {self.preset!r} allows "
                                   f"({limit} positions); use --context <= {limit}")
        if self.time_budget is not None and not float(self.time_budget) > 0:
            raise TrainConfigError(f"--time-budget must be > 0 seconds, got {self.time_budget!r}")
        for name in ("lr", "clipnorm"):
            if not float(getattr(self, name)) > 0:
                raise TrainConfigError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        ranges = {"min_lr_ratio": (0.0, 1.0, "]"), "beta1": (0.0, 1.0, ")"), "beta2": (0.0, 1.0, ")")}
        if self.dropout is not None:
            ranges["dropout"] = (0.0, 1.0, ")")
        for name, (low, high, bracket) in ranges.items():
            value = float(getattr(self, name))
            if not (low <= value <= high if bracket == "]" else low <= value < high):
                raise TrainConfigError(f"{flag(name)} must be in [{low:g}, {high:g}{bracket}, got {value!r}")
        if float(self.weight_decay) < 0:
            raise TrainConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise TrainConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 <= float(self.dev_fraction) < 1.0:
            raise TrainConfigError(f"--dev-fraction must be in [0, 1), got {self.dev_fraction!r}")
        if not 0.0 < float(self.train_fraction) <= 1.0:
            raise TrainConfigError(f"--train-fraction must be in (0, 1], got {self.train_fraction!r}")
        if self.dev_fraction and self.val_data is not None:
            raise TrainConfigError("--dev-fraction and --val-data both choose the validation text; pass one")
        for name, allowed in (("precision", PRECISIONS), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.xla not in (None, True, False):
            raise TrainConfigError(f"xla must be true, false or null (auto), got {self.xla!r}")
        if self.verbose not in (0, 1, 2, "auto"):
            raise TrainConfigError(f"--verbose must be 0, 1, 2 or auto, got {self.verbose!r}")
        try:  # the model settings make a valid GPTConfig (d_model divisible by n_heads, known norm position, ...)
            self.model_config(PRESETS[self.preset].vocab_size)
        except ConfigError as exc:
            raise TrainConfigError(f"model settings: {exc}") from None
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            raise TrainConfigError(f"--run-name must be a plain directory name, got {self.run_name!r}")
        for name in ("out", "logdir", "cache_dir"):
            value = getattr(self, name)
            if value is not None and Path(value).exists() and not Path(value).is_dir():
                raise TrainConfigError(f"{flag(name)} {value} is a file, not a directory; name a directory")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> dict[str, Any]:
        """`to_dict` with paths relative to the repository (as recorded in config.json)."""
        values = self.to_dict()
        for name in PATH_FIELDS:
            if values[name] is not None:
                values[name] = repo_relative(values[name])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the trained weights (all but `RUN_CONTROL_FIELDS`)."""
        values = {k: v for k, v in self.to_json().items() if k not in RUN_CONTROL_FIELDS}
        if not values["dev_fraction"]:  # runs made before the dev split existed keep their identity
            del values["dev_fraction"]
        for name, default in NEWER_FIELDS.items():  # ... and so do runs made before these settings existed
            if values[name] == default:
                del values[name]
        return values

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.preset}-{self.identity_hash()}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.resolved_run_name

    @property
    def log_dir(self) -> Path:
        return Path(self.logdir) / self.resolved_run_name

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The preset with the tokenizer's vocab size, `context` and `dropout` applied."""
        overrides: dict[str, Any] = {"vocab_size": int(vocab_size)}
        if self.context is not None:
            overrides["context"] = self.context
        if self.dropout is not None:
            overrides["dropout"] = float(self.dropout)
        for name in MODEL_FIELDS:
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        preset = PRESETS[self.preset]
        if self.d_model is not None and preset.d_ff == 4 * preset.d_model:
            overrides["d_ff"] = 0  # the feed-forward width follows the new D (F = 4 D), as in the preset
        return GPTConfig.from_preset(self.preset, **overrides)

    def warmup_steps(self, total_steps: int) -> tuple[int, str | None]:
        """(warm-up steps, notice or None) of a run of `total_steps`. A --warmup the user chose must be
        shorter than the run; the default adapts to a short run: 10 % of its steps, with a notice."""
        if self.warmup is not None:
            if self.warmup >= total_steps:
                raise TrainConfigError(f"--warmup {self.warmup} is not smaller than the {total_steps} training "
                                       "steps; lower --warmup")
            return self.warmup, None
        if total_steps >= 10 * DEFAULT_WARMUP:
            return DEFAULT_WARMUP, None
        warmup = total_steps // 10
        return warmup, (f"notice: warm-up {warmup} steps (10 % of this {total_steps}-step run; the default "
                        f"{DEFAULT_WARMUP} is for runs of {10 * DEFAULT_WARMUP}+ steps); set --warmup to choose")


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + name.replace("_", "-")


def config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """`name: saved -> current` for every weight-determining setting that differs."""
    now = current.identity()
    saved = {k: v for k, v in saved.items()  # as identity() drops them
             if not (k == "dev_fraction" and not v) and not (k in NEWER_FIELDS and v == NEWER_FIELDS[k])}
    keys = sorted(set(now) | {k for k in saved if k not in RUN_CONTROL_FIELDS})
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


# =========================================================================== the command line's settings
def read_train_section(path: Path, what: str) -> dict[str, Any]:
    """The `train` section (TrainConfig fields) of a run's config.json."""
    if not path.is_file():
        raise TrainConfigError(f"{what}: {path} does not exist; pass a run's config.json")
    try:
        train = (read_run_config(path) or {}).get("train")
    except RunError as exc:
        raise TrainConfigError(f"{what}: {exc}") from None
    if not isinstance(train, dict):
        raise TrainConfigError(f"{what}: {path} is not a tfgpt run config (no 'train' section)")
    return dict(train)


def settings_from_flags(
    flags: dict[str, Any], config: str | None = None, resume: str | None = None
) -> tuple[TrainConfig, bool | None]:
    """(TrainConfig, resume) from the flags given on the command line (`flags`: TrainConfig fields, only
    those given), `--config CONFIG_JSON` (a run's settings, which the flags override) and `--resume [RUN]`
    (a run name under --out or a run directory, whose settings the flags must not contradict; "" = the
    run these settings name). Checks the settings and their paths; raises TrainConfigError."""
    values: dict[str, Any] = {}
    if config:
        values.update(read_train_section(Path(config), "--config"))
    resume_flag = None
    if resume is not None:
        resume_flag = True
        if resume:
            candidate = Path(resume)
            run_dir = candidate if (candidate / "config.json").is_file() else Path(
                flags.get("out", values.get("out", "runs"))) / resume
            if not (run_dir / "config.json").is_file():
                raise TrainConfigError(f"--resume {resume}: no run at {run_dir} (no config.json); pass a run name "
                                       "under --out or a run directory")
            saved = read_train_section(run_dir / "config.json", f"--resume {resume}")
            given = {k: repo_relative(v) if k in PATH_FIELDS and v is not None else v for k, v in flags.items()}
            diffs = [f"{flag(k)} {flags[k]!r} (the run has {saved.get(k)!r})" for k, v in given.items()
                     if k not in RUN_CONTROL_FIELDS and k in saved and saved[k] != v]
            if diffs:
                raise TrainConfigError(f"--resume {resume}: {'; '.join(diffs)}; drop these flags to continue the "
                                       "run, or start a new one with another --run-name")
            values.update(saved)
            values.update(run_name=run_dir.name, out=str(run_dir.parent))
    values.update(flags)
    cfg = TrainConfig.from_dict(values)
    check_paths(cfg)
    return cfg, resume_flag


def check_paths(cfg: TrainConfig) -> None:
    """The tokenizer exists; `data`/`val_data` are existing paths or possible dataset ids."""
    tokenizer = Path(cfg.tokenizer)
    if not (tokenizer / "tokenizer.model").is_file() and not tokenizer.is_file():
        raise TrainConfigError(f"no tokenizer at {tokenizer}; pass --tokenizer DIR (holding tokenizer.model) or "
                               "train one with `python -m tfgpt.data train-tokenizer --data SOURCE --out DIR`")
    for name in ("data", "val_data"):
        source = getattr(cfg, name)
        if source and looks_like_path(source) and not Path(source).expanduser().exists():
            raise TrainConfigError(f"{flag(name)} path {source} does not exist; pass an existing file or directory "
                                   f"(the bundled sample: --data {BUNDLED_DATA}), or a Hugging Face dataset id")
