"""tf.distribute for train.py and eval.py: which strategy, which worker writes, and sync BN.

The original trained on TF1 parameter servers with ``SyncReplicasOptimizer``; TF2 has neither.
Its synchronous all-reduce strategies give the same update (the mean of the replicas'
gradients, applied once per step, the learning rate scaled by the replicas in sync):

* ``default``: one device, no distribution (what the original did without a cluster);
* ``mirrored``: ``MirroredStrategy`` over the local GPUs, a ``--devices`` list, or
  ``--cpu_devices`` logical CPUs (to try the distributed path on a laptop or in tests);
* ``multi_worker``: ``MultiWorkerMirroredStrategy``; the cluster and this process's place
  in it come from the ``TF_CONFIG`` environment variable;
* ``tpu``: ``TPUStrategy`` on the TPU named by ``--tpu`` (a name, or a ``grpc://`` address).

A multi-worker job never waits silently: start-up waits at most ``--worker_timeout_secs`` for
every worker of ``TF_CONFIG`` to register, a collective op waits at most as long, and the
coordination service's heartbeats (TensorFlow's default: 10 s) end every surviving worker
with an ``UnavailableError`` when one dies. Training then stops with a :class:`ClusterError`;
restarting all workers with the same command resumes from the last checkpoint. The start-up
deadline needs TensorFlow internals (``_configure_coordination``); without them it falls back
to TensorFlow's default wait, with a warning.

Synchronised batch norm (``--sync_batch_norm``): the original normalised each replica's batch
with its own statistics; ``use_cross_replica_batch_norm`` makes training-mode batch norm use
the statistics of the whole global batch instead, without changing the model's variables.
"""

from __future__ import annotations

import dataclasses
import json
import logging as logging_std
import os
from collections.abc import Mapping
from typing import Any, Optional

import tensorflow as tf
from absl import flags, logging

from adversarial_logit_pairing import advprop, tf_error_text
from adversarial_logit_pairing.errors import ConfigError, UserError
from adversarial_logit_pairing.models.layers import BatchNorm

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


class ClusterError(UserError, RuntimeError):
    """A worker of a multi-worker job (or the TPU) could not be reached or died."""


@dataclasses.dataclass
class DistributionConfig:
    """Plain-data mirror of the distribution flags of train.py and eval.py."""

    strategy: str = "default"
    devices: Optional[str] = None
    cpu_devices: int = 0
    tpu: Optional[str] = None
    tpu_zone: Optional[str] = None
    gcp_project: Optional[str] = None
    worker_timeout_secs: float = 600.0


def define_flags() -> None:
    """Defines the distribution flags (shared by train.py and eval.py)."""
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                      "tf.distribute strategy: 'default' (one device), 'mirrored' (local GPUs "
                      "or --devices / --cpu_devices), 'multi_worker' (cluster from TF_CONFIG), "
                      "'tpu' (--tpu). See docs/DISTRIBUTED.md.")
    flags.DEFINE_string("devices", None,
                        "--strategy=mirrored: comma-separated devices to mirror over, e.g. "
                        "'/gpu:0,/gpu:1' (default: every local GPU).")
    flags.DEFINE_integer("cpu_devices", 0,
                         "--strategy=mirrored without GPUs: split the host CPU into this many "
                         "logical devices and mirror over them (tests, trying things out).")
    flags.DEFINE_string("tpu", None,
                        "--strategy=tpu: TPU name or grpc:// address ('' or 'local': the TPU "
                        "of this VM).")
    flags.DEFINE_string("tpu_zone", None, "--strategy=tpu: GCE zone of the TPU (if a name).")
    flags.DEFINE_string("gcp_project", None, "--strategy=tpu: GCP project of the TPU.")
    flags.DEFINE_float("worker_timeout_secs", 600.0,
                       "--strategy=multi_worker: how long a worker waits for the others, at "
                       "start-up and in each collective, before stopping with an error.")


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return value


def _tf_config_workers(tf_config: Mapping) -> int:
    cluster = tf_config.get("cluster") or {}
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def apply_legacy_flags(config: DistributionConfig, ps_tasks: int = 0, task: int = 0,
                       master: str = "", worker_replicas: int = 1) -> DistributionConfig:
    """Maps the original's TF1 cluster flags onto ``config``, or says what to use instead.

    ``--master`` names the TPU with ``--strategy=tpu`` (as TF1 TPU scripts did). With
    ``--strategy=multi_worker``, ``--task`` and ``--worker_replicas`` are accepted when they
    agree with ``TF_CONFIG`` (so old launch scripts keep working). Parameter servers have no
    synchronous TF2 counterpart but the all-reduce workers.

    Raises:
      ConfigError: naming the flag and its replacement.
    """
    if ps_tasks:
        raise ConfigError(
            f"--ps_tasks={ps_tasks}: TF1 parameter servers do not exist in this port; for "
            "synchronous training on several machines use --strategy=multi_worker with "
            "TF_CONFIG listing the workers (no parameter servers), see docs/DISTRIBUTED.md")
    if master:
        if config.strategy != "tpu":
            raise ConfigError(
                f"--master={master!r}: TF1 session targets do not exist in TensorFlow 2; "
                "a cluster is given by TF_CONFIG with --strategy=multi_worker, a TPU by "
                "--strategy=tpu --tpu=<name or grpc:// address>")
        if config.tpu and config.tpu != master:
            raise ConfigError(f"--master={master!r} and --tpu={config.tpu!r} disagree; "
                              "give only --tpu")
        config = dataclasses.replace(config, tpu=master)
    if task or worker_replicas > 1:
        tf_config = _tf_config() if config.strategy == "multi_worker" else {}
        if not tf_config:
            raise ConfigError(
                f"--task={task} --worker_replicas={worker_replicas}: workers are described "
                "by TF_CONFIG ('cluster' lists them, 'task' says which one this is) with "
                "--strategy=multi_worker; see docs/DISTRIBUTED.md")
        index = int((tf_config.get("task") or {}).get("index", 0))
        if task and task != index:
            raise ConfigError(f"--task={task} disagrees with TF_CONFIG's task index {index}; "
                              "drop --task")
        workers = _tf_config_workers(tf_config)
        if worker_replicas > 1 and worker_replicas != workers:
            raise ConfigError(f"--worker_replicas={worker_replicas} disagrees with the "
                              f"{workers} workers of TF_CONFIG; drop --worker_replicas")
    return config


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into ``num_devices`` logical devices (before TensorFlow starts).

    Raises:
      ConfigError: TensorFlow's runtime was already initialised.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
    except RuntimeError as exc:
        raise ConfigError(f"--cpu_devices={num_devices}: logical devices must be configured "
                          f"before TensorFlow starts ({exc})") from None


def _configure_coordination(resolver: Any, timeout_secs: float) -> bool:
    """Makes cluster start-up fail after ``timeout_secs`` instead of waiting forever.

    MultiWorkerMirroredStrategy configures the coordination service itself, without a
    registration deadline for the leader; configured here first (same leader and jobs), every
    task waits at a registration barrier that times out. Heartbeats (a dead worker during
    training) and the collective timeout work without this.

    No public API sets that deadline (checked up to TF 2.21:
    ``tf.distribute.experimental.CommunicationOptions`` bounds collectives only), so this
    reaches into ``tensorflow.python``, which TensorFlow's compatibility promise does not
    cover; where those internals moved, start-up waits as long as TensorFlow's default,
    with a warning (docs/DISTRIBUTED.md), instead of failing.

    Returns:
      Whether the deadline is in place.
    """
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        if ctx.coordination_service is not None:
            return True
        spec = resolver.cluster_spec()
        jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                for job in ("chief", "worker") if job in spec.jobs]
        leader = "/job:chief/replica:0/task:0" if "chief" in spec.jobs else \
            "/job:worker/replica:0/task:0"
        ctx.configure_coordination_service(
            service_type="standalone", service_leader=leader, coordinated_jobs=jobs,
            cluster_register_timeout_in_ms=int(timeout_secs * 1000))
        ctx.coordination_service.cluster_register_with_barrier = True
        return True
    except (ImportError, AttributeError, TypeError) as exc:
        logging.warning(
            "TensorFlow %s lacks the internal coordination API this program was tested with "
            "(%s): --worker_timeout_secs bounds collectives but not start-up, where a missing "
            "worker is waited for as long as TensorFlow's default allows; a worker dying "
            "during training is still detected by heartbeats. See docs/DISTRIBUTED.md.",
            tf.__version__, exc)
        return False


def _multi_worker_strategy(config: DistributionConfig) -> tf.distribute.Strategy:
    tf_config = _tf_config()
    if not tf_config.get("cluster"):
        raise ConfigError(
            "--strategy=multi_worker reads the cluster from the TF_CONFIG environment "
            "variable, which is unset or has no 'cluster'; e.g. TF_CONFIG='{\"cluster\": "
            "{\"worker\": [\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": "
            "\"worker\", \"index\": 0}}'")
    if config.worker_timeout_secs <= 0:
        raise ConfigError(f"--worker_timeout_secs={config.worker_timeout_secs}: must be > 0")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    _configure_coordination(resolver, config.worker_timeout_secs)
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=config.worker_timeout_secs)
    logging.info("Waiting up to %.0fs for the %d workers of TF_CONFIG (this is %s %d)",
                 config.worker_timeout_secs, _tf_config_workers(tf_config),
                 resolver.task_type, resolver.task_id)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options)
    except tf.errors.OpError as exc:
        missing = sorted({line.strip() for line in exc.message.splitlines()
                          if line.startswith("/job:")})
        missing_text = f" (missing: {', '.join(missing)})" if missing else ""
        raise ClusterError(
            "the workers of TF_CONFIG did not all join within --worker_timeout_secs="
            f"{config.worker_timeout_secs:g}{missing_text}: {tf_error_text.reason(exc)}") from None


def _tpu_strategy(config: DistributionConfig) -> tf.distribute.Strategy:
    if config.tpu is None:
        raise ConfigError("--strategy=tpu needs --tpu=<TPU name or grpc:// address> "
                          "('local' on a TPU VM)")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=config.tpu, zone=config.tpu_zone, project=config.gcp_project)
        if config.tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise ClusterError(f"--tpu={config.tpu}: cannot reach the TPU ({exc})") from None
    return tf.distribute.TPUStrategy(resolver)


def create_strategy(config: DistributionConfig) -> tf.distribute.Strategy:
    """Builds the strategy ``config`` names; call it before any other TensorFlow work.

    Raises:
      ConfigError: flags that do not fit together.
      ClusterError: the workers or the TPU cannot be reached.
    """
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy={config.strategy}: expected one of "
                          f"{', '.join(STRATEGIES)}")
    if config.cpu_devices and config.strategy != "mirrored":
        raise ConfigError(f"--cpu_devices={config.cpu_devices} goes with --strategy=mirrored")
    if config.devices and config.strategy != "mirrored":
        raise ConfigError(f"--devices={config.devices} goes with --strategy=mirrored")
    if config.tpu and config.strategy != "tpu":
        raise ConfigError(f"--tpu={config.tpu} goes with --strategy=tpu")
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    quiet_collective_logs()
    if config.strategy == "multi_worker":
        return _multi_worker_strategy(config)
    if config.strategy == "tpu":
        return _tpu_strategy(config)
    devices = None
    if config.devices:
        devices = [d.strip() for d in config.devices.split(",") if d.strip()]
    elif config.cpu_devices:
        if config.cpu_devices < 1:
            raise ConfigError(f"--cpu_devices={config.cpu_devices}: must be >= 1")
        split_cpu(config.cpu_devices)
        devices = [f"/cpu:{i}" for i in range(config.cpu_devices)]
    try:
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--devices={config.devices}: {exc}") from None
    logging.info("Mirroring over %s", strategy.extended.worker_devices)
    return strategy


class _DropCollectiveChatter(logging_std.Filter):
    """Drops tf.distribute's INFO line per eager all-reduce (one per synchronised variable at
    every checkpoint), which would drown the training log."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return not str(record.msg).startswith("Collective all_reduce tensors")


def quiet_collective_logs() -> None:
    """Installs :class:`_DropCollectiveChatter` on TensorFlow's logger (once)."""
    logger = tf.get_logger()
    if not any(isinstance(f, _DropCollectiveChatter) for f in logger.filters):
        logger.addFilter(_DropCollectiveChatter())


# ---- Workers ---------------------------------------------------------------------------------

def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Number of worker processes taking part in ``strategy`` (1 unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the checkpoints and summaries everyone reads."""
    return bool(strategy.extended.should_checkpoint)


def worker_temp_dir(output_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where a non-chief worker writes the checkpoints it must take part in (then deletes)."""
    task_id = getattr(getattr(strategy, "cluster_resolver", None), "task_id", 0) or 0
    return os.path.join(output_dir, f"workertemp_{task_id}")


def check_same_on_all_workers(strategy: tf.distribute.Strategy, value: int, what: str) -> None:
    """Raises on every worker when the workers hold different ``value`` s.

    Used on the global step after restoring: workers that see different checkpoints (an
    ``--output_dir`` on a disk that is not shared) would otherwise run mismatched steps.

    Raises:
      ClusterError: naming ``what`` and the spread of values.
    """
    if num_workers(strategy) < 2:
        return
    # Sum and sum of squares are equal on every worker, so every worker takes the same branch.
    local = tf.constant([float(value), float(value) ** 2], tf.float64)

    def replica_sums():
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, local)

    @tf.function
    def all_sums():
        return strategy.run(replica_sums)

    sums = strategy.experimental_local_results(all_sums())[0].numpy()
    count = strategy.num_replicas_in_sync
    mean = sums[0] / count
    if abs(sums[1] / count - mean * mean) > 1e-6:
        raise ClusterError(
            f"the workers disagree on the {what} (this one: {value}, mean: {mean:g}); every "
            "worker must see the same --output_dir (shared storage such as GCS or NFS)")


# ---- Per-replica randomness -------------------------------------------------------------------

def replica_seed(seed: tf.Tensor) -> tf.Tensor:
    """``seed`` made distinct per replica (unchanged with a single replica).

    Without it, every replica would draw the same random start for its i-th example.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return seed
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return tf.random.experimental.stateless_fold_in(seed, replica_id)


# ---- Synchronised batch norm ------------------------------------------------------------------

class CrossReplicaBatchNorm(tf.Module):
    """A :class:`BatchNorm` whose training mode uses the statistics of the global batch.

    It holds no variables of its own: it reads and updates those of the wrapped layer (gamma,
    beta, moving statistics), so checkpoints are unchanged. Mean and variance are all-reduced
    over the replicas in two passes (mean, then the squared deviations from it), which keeps
    the variance accurate; the moving variance follows the Bessel-corrected global variance,
    as the fused kernel reports it for a single device. With one replica it is the layer.
    """

    def __init__(self, layer: BatchNorm):
        super().__init__(name=layer.name + "_cross_replica")
        self.layer = layer

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        ctx = tf.distribute.get_replica_context()
        if not is_training or ctx is None or ctx.num_replicas_in_sync == 1:
            return self.layer(x, is_training)
        layer = advprop.twin_in_use(self.layer) or self.layer  # AdvProp's auxiliary pass
        axes = [0, 1, 2]
        x32 = tf.cast(x, tf.float32)
        local_count = tf.cast(tf.reduce_prod(tf.shape(x32)[:-1]), tf.float32)
        sum_and_count = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM,
            tf.concat([tf.reduce_sum(x32, axes), local_count[None]], axis=0))
        count = sum_and_count[-1]
        mean = sum_and_count[:-1] / count
        variance = ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(x32 - mean), axes)) / count
        gamma = layer.gamma if layer.gamma is not None else tf.ones([layer.channels])
        beta = layer.beta if layer.beta is not None else tf.zeros([layer.channels])
        y = tf.nn.batch_normalization(x32, mean, variance, beta, gamma, layer.epsilon)
        rate = 1.0 - layer.decay
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        for moving, batch in ((layer.moving_mean, mean), (layer.moving_variance, unbiased)):
            moving.assign_sub((moving - tf.stop_gradient(batch)) * rate)
        return tf.cast(y, x.dtype)


def use_cross_replica_batch_norm(model: tf.Module) -> int:
    """Makes every :class:`BatchNorm` of ``model`` normalise with global-batch statistics.

    Replaces each BatchNorm attribute of the model and its submodules by a
    :class:`CrossReplicaBatchNorm` around it; the variables (and so ``variables_by_name`` and
    checkpoints) stay the same objects.

    Returns:
      The number of batch-norm layers switched.

    Raises:
      ConfigError: (a ValueError) a batch-norm layer is reachable only through a container
        (list, dict), where it cannot be switched; the model would silently keep per-replica
        statistics there, so ``--sync_batch_norm`` is refused for such a model.
    """
    modules = (model, *model.submodules)
    present = {id(m): m for m in modules if isinstance(m, BatchNorm)}
    switched = {}
    for module in modules:
        if isinstance(module, CrossReplicaBatchNorm):
            continue
        for attribute, value in list(vars(module).items()):
            if isinstance(value, BatchNorm):
                setattr(module, attribute, CrossReplicaBatchNorm(value))
                switched[id(value)] = value
    missed = [present[key].scope for key in present if key not in switched]
    if missed:
        raise ConfigError(f"--sync_batch_norm: cannot switch the batch norm of {missed} (not "
                          "an attribute of a module)")
    return len(switched)
