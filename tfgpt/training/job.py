"""The training job: `train(TrainConfig)` wires data, strategy, model, callbacks and run directory into
`model.fit` calls, then finishes the run (best model, metrics, export). Each step is a function below; the
run's data, plan and hardware are set up by `tfgpt.training.setup`.

Symbols: B = global batch size, T = context, S = steps per epoch = ⌊(N−1)/T⌋ // B for N tokens.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfgpt.common import repo_relative, source_revision
from tfgpt.data import make_dataset
from tfgpt.model import GPT
from tfgpt.runs import (
    PINNED_TOKENIZER,
    RunError,
    RunState,
    backup_path,
    load_backup,
    pin_tokenizer,
    write_run_file,
)
from tfgpt.tokenizer import Tokenizer
from tfgpt.training.callbacks import BestModelCheckpoint, RunMonitor, StateBackup, StepTensorBoard
from tfgpt.training.config import TrainConfig, TrainConfigError, TrainingError
from tfgpt.training.resume import check_resume_tokenizer, find_run, finished_result
from tfgpt.training.setup import (
    Hardware,
    Plan,
    RunData,
    load_data,
    plan_steps,
    resolve_hardware,
    validation_text,
)
from tfgpt.training.strategy import compile_model, on_cpu

#: Fixed prompts for the sampled stories logged at each epoch end.
SAMPLE_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The big dog")


def train(
    cfg: TrainConfig,
    *,
    resume: bool | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    notify: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) the training job described by `cfg`; returns the run summary (metrics.json).

    `resume`: None continues runs/<run>/ when it holds a backup made with the same settings (a rerun
    of the same command), True requires such a backup, False refuses to touch an existing backup.
    Raises TrainConfigError (bad settings/paths/resume), DataError/TokenizerError (data), and
    TrainingError if the loss diverges.
    """
    start_time = time.monotonic()
    backup_file = find_run(cfg, resume)
    if backup_file is not None and (done := finished_result(cfg, backup_file, notify)) is not None:
        return done
    data = load_data(cfg)
    if backup_file is not None:
        check_resume_tokenizer(cfg, data.tokenizer)
    job = Job(cfg, data, plan_steps(cfg, data, notify), resolve_hardware(cfg, notify), notify)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        job.model = compile_model(
            data.model_config, strategy=job.hw.strategy, precision=job.hw.precision, xla=job.hw.xla,
            lr=job.plan.schedule, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
            clipnorm=cfg.clipnorm, seed=cfg.seed,
        )  # fmt: skip
        restore(job, backup_file)
        if job.hw.chief:
            pin_tokenizer(cfg.run_dir, data.tokenizer)
            write_run_file(cfg.run_dir, "config.json", job.record())
        callbacks = make_callbacks(job, start_time, extra_callbacks)
        announce(job, backup_file)
        fit(job, callbacks.all)
        return finish(job, callbacks)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


# =========================================================================== what a run is made of
@dataclass
class Job:
    cfg: TrainConfig
    data: RunData
    plan: Plan
    hw: Hardware
    notify: Callable[[str], None]
    model: GPT | None = None
    state: RunState = field(default_factory=RunState)
    resumed_from: int | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.data.model_config.context

    def record(self) -> dict[str, Any]:
        """config.json: every setting and what it resolved to (paths relative to the repository)."""
        cfg, data, plan, hw = self.cfg, self.data, self.plan, self.hw
        return {
            "model": data.model_config.to_dict(),
            "train": cfg.to_json(),
            "run_name": cfg.resolved_run_name,
            "tokenizer": PINNED_TOKENIZER,  # the run's own copy (runs/<run>/tokenizer), see tfgpt.runs.pin_tokenizer
            "tokenizer_source": repo_relative(cfg.tokenizer),
            "tokenizer_info": {"vocab_size": data.tokenizer.vocab_size, "sha256": data.tokenizer.sha256,
                               "eos_id": data.tokenizer.eos_id},
            "data": {
                "train": repo_relative(cfg.data),
                "validation": validation_text(cfg),
                "train_tokens": int(len(data.train_tokens)),
                "val_tokens": int(len(data.val_tokens)),
            },
            "schedule": {"steps_per_epoch": data.steps_per_epoch, "total_steps": plan.total_steps,
                         "epochs": plan.epochs, "warmup": plan.warmup, "tokens_per_step": self.tokens_per_step,
                         "val_batches": data.val_batches},
            "resolved": {"precision": hw.precision, "xla": hw.xla, "strategy": hw.kind, "replicas": hw.replicas,
                         "parameters": int(self.model.count_params())},
            "identity": cfg.identity_hash(),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": sys.version.split()[0]},
            "source": source_revision(),
        }  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """metrics.json: where the run stands, its last and best numbers and every epoch's record."""
        st, total, tokens = self.state, self.plan.total_steps, self.tokens_per_step
        last = st.history[-1] if st.history else {}
        return {
            "run_name": self.cfg.resolved_run_name,
            "run_dir": repo_relative(self.cfg.run_dir),
            "status": st.status,
            "global_step": st.global_step,
            "total_steps": total,
            "steps_per_epoch": self.data.steps_per_epoch,
            "tokens_seen": st.global_step * tokens,
            "wall_time_s": round(st.wall_time, 3),
            "tokens_per_sec": round(st.global_step * tokens / max(st.wall_time, 1e-9), 1),
            "final_train_loss": last.get("train_loss"),
            "final_val_loss": last.get("val_loss"),
            "final_val_perplexity": last.get("val_perplexity"),
            "best_val_loss": st.best_val_loss,
            "best_epoch": st.best_epoch,
            "resumed_from_step": self.resumed_from,
            "saved_model": st.saved_model,
            "precision": self.hw.precision,
            "xla": self.hw.xla,
            "strategy": self.hw.kind,
            "replicas": self.hw.replicas,
            "epochs": st.history,
        }


@dataclass
class Callbacks:
    monitor: RunMonitor
    tensorboard: StepTensorBoard | None
    backup: StateBackup
    all: list[keras.callbacks.Callback]


# =========================================================================== the steps of `train`
def restore(job: Job, backup_file: Path | None) -> None:
    """Continue from the backup, if any: weights, optimizer, position and history."""
    if backup_file is None:
        return
    try:
        job.state = load_backup(backup_file, job.model)
    except RunError as exc:
        raise TrainConfigError(str(exc)) from None
    job.resumed_from = job.state.global_step
    if job.state.status != "early_stopped":  # an early-stopped run has nothing left to train
        job.state.status = "running"


def make_callbacks(job: Job, start_time: float, extra: Sequence[keras.callbacks.Callback]) -> Callbacks:
    """Bookkeeping for every worker; TensorBoard, best model and backups written by the chief only."""
    cfg, state, chief = job.cfg, job.state, job.hw.chief
    monitor = RunMonitor(
        state, steps_per_epoch=job.data.steps_per_epoch, total_steps=job.plan.total_steps,
        tokens_per_step=job.tokens_per_step, schedule=job.plan.schedule, check_every=cfg.log_every,
        time_budget=cfg.time_budget, start_time=start_time, patience=cfg.patience,
        run_dir=cfg.run_dir if chief else None, summary=job.summary,
    )  # fmt: skip
    tensorboard = None
    if chief:
        sampler = make_sampler(job) if cfg.sample_tokens else None
        tensorboard = StepTensorBoard(cfg.log_dir, state, log_every=cfg.log_every,
                                      tokens_per_step=job.tokens_per_step, schedule=job.plan.schedule, sampler=sampler)
    backup = StateBackup(backup_path(cfg.run_dir), state, cfg.identity_hash(), cfg.backup_every, enabled=chief)
    chief_only = [tensorboard, BestModelCheckpoint(cfg.run_dir / "model.keras", state)] if chief else []
    return Callbacks(monitor, tensorboard, backup, [monitor, *chief_only, backup, *extra])


def where(job: Job) -> str:
    return str(job.cfg.run_dir) if job.hw.chief else f"{job.cfg.run_dir} (written by the chief worker)"


def announce(job: Job, backup_file: Path | None) -> None:
    cfg, data, plan, hw, mc = job.cfg, job.data, job.plan, job.hw, job.data.model_config
    job.notify(
        f"run {cfg.resolved_run_name}: {mc.name} ({job.model.count_params():,} parameters, V={mc.vocab_size}, "
        f"T={mc.context}) | {hw.kind} strategy x{hw.replicas} | {hw.precision} | XLA {'on' if hw.xla else 'off'} | "
        f"{plan.epochs} epoch(s) x {data.steps_per_epoch} steps, {plan.total_steps} steps of "
        f"{cfg.batch_size}x{mc.context} tokens | {where(job)}"
    )
    if backup_file is not None:
        st = job.state
        job.notify(f"resuming from step {st.global_step} (epoch {st.epoch + 1}, batch {st.step_in_epoch}) "
                   f"of {backup_file}")


def fit_plan(global_step: int, steps_per_epoch: int, total_steps: int) -> list[tuple[int, int, int, int]]:
    """The `model.fit` calls that take a run from `global_step` to `total_steps`.

    Each item is (first epoch, number of epochs, steps per epoch, batches of the first epoch to skip):
    a resumed partial epoch, then the whole epochs, then a last partial epoch (--max-steps), so that
    Keras epoch e is always data epoch e and the progress bar counts the steps actually run.
    """
    plan = []
    g = global_step
    while g < total_steps:
        epoch, skip = divmod(g, steps_per_epoch)
        steps = min(steps_per_epoch - skip, total_steps - g)
        n = (total_steps - g) // steps_per_epoch if skip == 0 and steps == steps_per_epoch else 1
        plan.append((epoch, n, steps, skip))
        g += n * steps
    return plan


def fit(job: Job, callbacks: list[keras.callbacks.Callback]) -> None:
    """One `model.fit` per run of equal-length epochs; epoch e of the data is Keras epoch e."""
    cfg, data, state, model = job.cfg, job.data, job.state, job.model
    T, B = data.model_config.context, cfg.batch_size
    val_ds = make_dataset(data.val_tokens, T, B, shuffle=False, repeat=False).take(data.val_batches)
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(data.val_batches))
    plan = fit_plan(state.global_step, data.steps_per_epoch, job.plan.total_steps) if state.status == "running" else []
    for first_epoch, n_epochs, steps, skip in plan:
        train_ds = make_dataset(data.train_tokens, T, B, seed=cfg.seed, first_epoch=first_epoch, skip_batches=skip,
                                repeat=True)
        model.fit(train_ds, epochs=first_epoch + n_epochs, initial_epoch=first_epoch, steps_per_epoch=steps,
                  shuffle=False, validation_data=val_ds, callbacks=callbacks, verbose=cfg.verbose if job.hw.chief else 0)
        if model.stop_training or state.status != "running":
            break
    if state.status == "running" and state.global_step >= job.plan.total_steps:  # also: resumed at the end
        state.status = "completed"


def finish(job: Job, callbacks: Callbacks) -> dict[str, Any]:
    """Close the logs; on the chief export the best model, write metrics.json and mark the backup finished
    (a run stopped by its time budget stays resumable). Raises TrainingError if the loss diverged."""
    cfg, state, chief = job.cfg, job.state, job.hw.chief
    if callbacks.tensorboard is not None:
        callbacks.tensorboard.close()
    if state.status == "diverged":
        if chief:
            write_run_file(cfg.run_dir, "metrics.json", job.summary())
        raise TrainingError(callbacks.monitor.nan_message or "the training loss is not finite")
    if chief:
        if cfg.export:
            exported = export_best(cfg.run_dir, job.data.tokenizer, job.notify)
            state.saved_model = repo_relative(exported) if exported is not None else None
        state.finished = state.status in ("completed", "early_stopped")
        write_run_file(cfg.run_dir, "metrics.json", job.summary())
        callbacks.backup.set_model(job.model)
        callbacks.backup.save()
    result = job.summary()
    job.notify(
        f"{state.status}: step {state.global_step}/{job.plan.total_steps}, val loss {_fmt(result['final_val_loss'])} "
        f"(best {_fmt(state.best_val_loss)}, epoch {state.best_epoch}), {result['tokens_per_sec']:.0f} tokens/s | "
        f"{where(job)}"
    )
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# =========================================================================== samples and export
def make_sampler(job: Job) -> Callable[[int], dict[str, list[str]]]:
    """Epoch-end stories from `SAMPLE_PROMPTS`: greedy and temperature 0.8 (seeded per epoch). On CPU the
    XLA-compiled decoding loop takes seconds to compile for little gain at this size (and cannot read
    variables mirrored over CPU devices); on GPU/TPU it is compiled."""
    from tfgpt.generation import generate_text

    cfg, jit = job.cfg, not on_cpu(job.hw.strategy)

    def sample(epoch: int) -> dict[str, list[str]]:
        out = {}
        for tag, sampling in (
            ("samples/greedy", {"temperature": 0.0}),
            ("samples/temperature_0.8", {"temperature": 0.8, "seed": cfg.seed + epoch}),
        ):
            texts = generate_text(job.model, job.data.tokenizer, list(SAMPLE_PROMPTS), max_new_tokens=cfg.sample_tokens,
                                  jit_compile=jit, **sampling)
            out[tag] = [f"**{p}** {t}" for p, t in zip(SAMPLE_PROMPTS, texts, strict=True)]
        return out

    return sample


def export_best(run_dir: Path, tokenizer: Tokenizer, notify: Callable[[str], None]) -> Path | None:
    """Export the best model (model.keras) as runs/<run>/saved_model via tfgpt.export."""
    from tfgpt.export import export_saved_model

    best = run_dir / "model.keras"
    if not best.is_file():
        notify("notice: no best model (no finite validation loss); no SavedModel exported")
        return None
    keras.mixed_precision.set_global_policy("float32")  # serve in float32 whatever the training precision
    model = keras.saving.load_model(best, compile=False)
    out = export_saved_model(model, tokenizer, run_dir / "saved_model")
    notify(f"exported {out}")
    return out
