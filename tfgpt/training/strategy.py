"""Where and how a run computes: the `tf.distribute` strategy, the precision policy, XLA, and
`compile_model`, the one set-up of a trainable model under them (`train` and the benchmarks use it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model import GPT, build_model
from tfgpt.training.config import STRATEGIES, TrainConfigError
from tfgpt.training.optim import WarmupCosine, build_optimizer, next_token_loss

#: What `--precision auto` / `--xla auto` resolve to on a CPU: the fastest combination measured with the
#: fused kernels by `bench/train_throughput.py --only tfgpt-fp32-xla tfgpt-fp32 tfgpt-bf16-xla tfgpt-bf16`
#: (figures in bench/RESULTS.md): mixed_bfloat16 without XLA. bf16 matmuls are fast here only through
#: oneDNN: XLA's CPU dot does not use AMX for bfloat16.
CPU_AUTO_PRECISION = "mixed_bfloat16"
CPU_AUTO_XLA = False


def resolve_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for `--strategy name` (see `TrainConfig.strategy`)."""
    if name == "auto":  # TF_CONFIG first: a multi-worker strategy must be made before devices are listed
        if os.environ.get("TPU_NAME"):
            name = "tpu"
        elif tf_config_workers() > 1:
            name = "multiworker"
        elif tf.config.list_logical_devices("TPU"):
            name = "tpu"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        # Several logical CPU devices (tf.config.set_logical_device_configuration): mirror over them.
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise TrainConfigError(
                "--strategy multiworker needs the TF_CONFIG environment variable (cluster + task) on every "
                "worker; see README 'Distributed training'"
            )
        return MultiWorkerStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", "local"))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as exc:
            raise TrainConfigError(
                f"--strategy tpu found no TPU ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "run on a TPU VM or set TPU_NAME"
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise TrainConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3.15's `fit` hands it (keras#20585).

    * a nested structure: `fit` reduces the first batch, an (inputs, targets) pair, to build the model,
      and TF 2.21's multi-worker `reduce` accepts one value only ("Attempt to convert a value
      (PerReplica...)"); MirroredStrategy maps over the structure, so does this one;
    * a scalar with `axis=0`: `fit` reduces each step's logs (the scalar loss) along axis 0, which fails
      for a scalar ("Invalid reduction dimension 0"); a scalar is reduced across replicas only.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super().reduce

        def reduce_one(v):
            local = self.experimental_local_results(v)[0]
            scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
            return parent(reduce_op, v, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def tf_config_workers() -> int:
    """Chief + worker tasks of the TF_CONFIG cluster (0 without one)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        return 0
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def strategy_kind(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    return "default"


def on_cpu(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy's (local) replicas are CPU devices."""
    kind = strategy_kind(strategy)
    if kind == "tpu":
        return False
    if kind in ("mirrored", "multiworker"):
        return all("CPU" in d.upper() for d in strategy.extended.worker_devices)
    return not tf.config.list_logical_devices("GPU")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The one process that writes the run directory and the logs (always, but for multi-worker)."""
    if strategy_kind(strategy) != "multiworker":
        return True
    resolver = strategy.cluster_resolver
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs
    )


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> str:
    """`--precision auto`: TPU and GPUs with compute capability ≥ 8 (Ampere+) mixed_bfloat16, older
    GPUs mixed_float16, CPU the fastest measured setting (`CPU_AUTO_PRECISION`)."""
    if precision != "auto":
        return precision
    if strategy_kind(strategy) == "tpu":
        return "mixed_bfloat16"
    if on_cpu(strategy):
        return CPU_AUTO_PRECISION
    gpus = tf.config.list_physical_devices("GPU")
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0)) if gpus else (0, 0)
    return "mixed_bfloat16" if tuple(capability) >= (8, 0) else "mixed_float16"


def resolve_xla(xla: bool | None, strategy: tf.distribute.Strategy, notify: Callable[[str], None] = print) -> bool:
    """`--xla auto`: on for GPU/TPU, `CPU_AUTO_XLA` on CPU. Forced off for several replicas on CPU
    (mirrored over logical CPU devices, multi-worker), where the compiled step fails: it reads a
    resource that lives on another device."""
    cpu = on_cpu(strategy)
    if xla is None:
        xla = CPU_AUTO_XLA if cpu else True
    if xla and cpu and strategy.num_replicas_in_sync > 1:
        name = {"mirrored": "MirroredStrategy", "multiworker": "MultiWorkerMirroredStrategy"}[strategy_kind(strategy)]
        notify(f"notice: XLA is off: {name} over CPU devices cannot run a jit-compiled step")
        xla = False
    return bool(xla)


def compile_model(
    model_config: GPTConfig,
    *,
    strategy: tf.distribute.Strategy,
    precision: str,
    xla: bool,
    lr: float | keras.optimizers.schedules.LearningRateSchedule,
    total_steps: int | None = None,
    warmup: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    clipnorm: float | None = 1.0,
    seed: int = 0,
    optimizer: Callable[[GPT], keras.optimizers.Optimizer] | None = None,
) -> GPT:
    """Build and compile a GPT inside `strategy.scope()` under the `precision` policy (set globally:
    the caller restores it).

    `lr` is the learning-rate schedule, or a peak rate for `WarmupCosine(lr, warmup, total_steps)` (a
    constant rate without `total_steps`). `optimizer(model)` replaces `build_optimizer` (tests, benchmarks).
    The optimizer's variables and the compiled loss are built here, so a backup can be restored before
    the first step, and `fit` has nothing left to build: under a strategy it would build the loss from
    the MEAN over replicas of the first batch, which is float32 and fails in the embedding gather.
    """
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    if not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) and total_steps is not None:
        lr = WarmupCosine(lr, warmup, total_steps, min_lr_ratio)
    with strategy.scope():
        model = build_model(model_config)
        if optimizer is not None:
            opt = optimizer(model)
        else:
            opt = build_optimizer(model, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                                  clipnorm=clipnorm, loss_scale=precision == "mixed_float16")
        model.compile(optimizer=opt, loss=next_token_loss(), jit_compile=xla)
        model.optimizer.build(model.trainable_variables)
        ids = np.zeros((1, min(8, model_config.context)), np.int32)
        model.compute_loss(x=ids, y=ids, y_pred=model(ids), training=False)  # builds the compiled loss
    return model
