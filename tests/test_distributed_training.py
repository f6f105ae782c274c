"""Training under tf.distribute: mirrored replicas, several workers, and XLA.

What a replica does, and why the references below look as they do:

* each replica attacks and trains on its own ``batch_size`` clean images, with a random start
  seeded per replica; the optimizer applies the MEAN of the replicas' gradients once;
* batch norm normalises with each replica's own batch statistics (as the original's workers
  did), and each replica updates its own copy of the moving statistics, which a read outside
  the step (checkpoint, moving average) averages. So per-replica training equals a reference
  that runs each replica's half on one device with that replica's copy of the statistics;
* with ``sync_batch_norm`` the statistics are those of the whole global batch, so mirrored
  training equals plain single-device training on the global batch.

Logical CPU devices must exist before TensorFlow starts, so the mirrored runs happen in a
subprocess: ``python -m tests.test_distributed_training mirrored <out.npz>``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from tests.data_builders import write_tiny_imagenet_tfrecords
from tests.program_runs import (
    ALP,
    MODEL_FLAGS,
    checkpoint_values,
    finish,
    finish_all,
    kill_all,
    latest_step,
    logged_steps,
    program,
    read_log,
    run_experiment,
    save_experiment,
    scalar_events,
    start,
    wait_for,
)

MODEL = "resnet_v2_tiny"
NUM_CLASSES = 10
IMAGE_SIZE = 32
BATCH = 4  # per replica
STEPS = 3
SEED = 3
ALP_METHOD = "pgdll_16_2_1"
BOUNDS = (-1.0, 1.0)


# ---- The mirrored experiment (runs in a subprocess) -------------------------------------------

def _hparams(method: str):
    from adversarial_logit_pairing import model_lib

    # Clean runs without pairing: clean logit pairing pairs halves of each replica's batch,
    # which is not the same pairs as on one device with the global batch.
    lp_weight = 0.0 if method == "clean" else 0.5
    return model_lib.default_hparams().parse(
        f"batch_size={BATCH},train_adv_method={method},train_lp_weight={lp_weight}")


def _build(strategy, hparams, lr_replicas: int, sync_bn: bool):
    """The training state train() builds: model, step, schedule, optimizer, moving average."""
    from adversarial_logit_pairing import training

    return training.build_train_state(strategy, MODEL, NUM_CLASSES, hparams, 100000,
                                      lr_replicas=lr_replicas, sync_batch_norm=sync_bn)


def _state(state) -> dict:
    # A read outside the step: on-read variables give their mean over the replicas.
    return {name: np.asarray(v.read_value()) for name, v in state.checkpoint_variables().items()}


def _train(strategy, images, labels, method: str, sync_bn: bool):
    """Steps of training.make_train_step under ``strategy`` on fixed global batches."""
    from adversarial_logit_pairing import training

    hparams = _hparams(method)
    replicas = strategy.num_replicas_in_sync
    # On one device --replicas_to_aggregate=2 gives the learning rate two replicas get.
    lr_replicas = training.learning_rate_replicas(replicas, 1 if replicas > 1 else 2)
    state = _build(strategy, hparams, lr_replicas, sync_bn)
    step = training.make_train_step(strategy, state.model, state.trainable, state.optimizer,
                                    state.ema, state.global_step, hparams, NUM_CLASSES, BOUNDS,
                                    seed=SEED)
    global_batch = tf.data.Dataset.from_tensor_slices(
        (images.reshape(-1, *images.shape[2:]), labels.reshape(-1))
    ).batch(images.shape[1], drop_remainder=True)
    losses, rates = [], []
    for batch_images, batch_labels in strategy.experimental_distribute_dataset(global_batch):
        outputs = step(batch_images, batch_labels)
        losses.append(float(outputs["total_loss"]))
        rates.append(float(outputs["learning_rate"]))
    copies = strategy.experimental_local_results(
        state.model.variables_by_name[f"{MODEL}/postnorm/moving_mean"])
    spread = float(max(np.abs(np.asarray(c) - np.asarray(copies[0])).max() for c in copies))
    return _state(state), losses, rates, spread


def _per_replica_reference(images, labels, method: str, replicas: int = 2):
    """Per-replica batch norm computed on one device, one replica's half at a time."""
    from adversarial_logit_pairing import adversarial_attack, training

    hparams = _hparams(method)
    state = _build(tf.distribute.get_strategy(), hparams, replicas, sync_bn=False)
    model, trainable, global_step, optimizer, ema = (
        state.model, state.trainable, state.global_step, state.optimizer, state.ema)
    statistics = {name: v for name, v in model.variables_by_name.items()
                  if v.synchronization == tf.VariableSynchronization.ON_READ}
    copies = [{name: v.numpy() for name, v in statistics.items()} for _ in range(replicas)]

    def inference(z):
        return model(z, is_training=False)

    losses = []
    for step in range(images.shape[0]):
        grads, totals = None, []
        for r in range(replicas):
            for name, v in statistics.items():
                v.assign(copies[r][name])
            x = tf.constant(images[step, r * BATCH:(r + 1) * BATCH])
            one_hot = tf.one_hot(labels[step, r * BATCH:(r + 1) * BATCH], NUM_CLASSES)
            seed = tf.random.experimental.stateless_fold_in(
                tf.constant([SEED, step], tf.int64), r)
            adv = adversarial_attack.generate_adversarial_examples(
                x, BOUNDS, inference, method, seed=seed)
            with tf.GradientTape() as tape:
                logits = model(tf.concat([x, adv], 0), is_training=True)
                loss = training.alp_losses(logits, tf.concat([one_hot, one_hot], 0),
                                           trainable, hparams)
            replica_grads = tape.gradient(loss["total_loss"], trainable)
            grads = replica_grads if grads is None else [a + b for a, b in
                                                         zip(grads, replica_grads)]
            totals.append(float(loss["total_loss"]))
            copies[r] = {name: v.numpy() for name, v in statistics.items()}
        for name, v in statistics.items():
            v.assign(np.mean([copy[name] for copy in copies], axis=0))
        optimizer.apply_gradients([(g / replicas, v) for g, v in zip(grads, trainable)],
                                  global_step)
        ema.apply(global_step)
        losses.append(float(np.mean(totals)))
    return _state(state), losses


def _evaluate(strategies: dict, data_dir: str, out_path: str) -> dict:
    """eval.py's Evaluator on one checkpoint under each strategy: metrics and predictions."""
    from adversarial_logit_pairing import checkpoints, evaluation, model_lib

    model = model_lib.get_model(MODEL, 200, seed=1)
    prefix = checkpoints.save(model.variables_by_name, out_path + "_checkpoint", 0)
    results = {}
    for name, (strategy, adv_method) in strategies.items():
        config = evaluation.EvalConfig(
            checkpoint_path=prefix, model_name=MODEL, dataset="tiny_imagenet",
            dataset_image_size=IMAGE_SIZE, tiny_imagenet_data_dir=data_dir,
            hparams="eval_batch_size=8", moving_average_decay=-1, adv_method=adv_method,
            predictions_file=f"{out_path}_{name}.npz")
        result = evaluation.Evaluator(config, strategy).evaluate(prefix)
        results[name] = {"accuracy": result.accuracy, "top5": result.top5,
                         "num_examples": result.num_examples}
    return results


def mirrored_experiment(out_path: str, data_dir: str) -> None:
    """Runs every variant and saves states and losses to ``out_path`` (.npz + .json)."""
    from adversarial_logit_pairing import distribution

    distribution.split_cpu(2)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (STEPS, 2 * BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (STEPS, 2 * BATCH))
    runs = {
        "single_clean": _train(tf.distribute.get_strategy(), images, labels, "clean", False),
        "mirrored_sync_clean": _train(mirrored, images, labels, "clean", True),
        "mirrored_alp": _train(mirrored, images, labels, ALP_METHOD, False),
    }
    reference_state, reference_losses = _per_replica_reference(images, labels, ALP_METHOD)
    states, summary = {"reference_alp": reference_state}, {
        "reference_alp": {"losses": reference_losses}}
    summary["eval"] = _evaluate({"single": (tf.distribute.get_strategy(), "clean"),
                                 "mirrored": (mirrored, "clean"),
                                 "mirrored_pgd": (mirrored, "pgd_16_2_1")}, data_dir, out_path)
    for run, (state, losses, rates, spread) in runs.items():
        states[run] = state
        summary[run] = {"losses": losses, "learning_rates": rates, "replica_spread": spread}
    save_experiment(out_path, summary, states)


# ---- Flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "flags,culprit",
    [
        (dict(ps_tasks=2), "--ps_tasks=2: .* --strategy=multi_worker"),
        (dict(master="grpc://10.0.0.1:8470"), "--master=.* --strategy=tpu"),
        (dict(task=1), "--task=1 .* TF_CONFIG"),
        (dict(worker_replicas=4), "--worker_replicas=4: .* TF_CONFIG"),
    ],
)
def test_tf1_cluster_flags_are_refused_with_what_to_use_instead(monkeypatch, flags, culprit):
    from adversarial_logit_pairing import distribution
    from adversarial_logit_pairing.errors import ConfigError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=culprit):
        distribution.apply_legacy_flags(distribution.DistributionConfig(), **flags)


def test_tf1_cluster_flags_that_agree_with_the_cluster_are_kept(monkeypatch):
    from adversarial_logit_pairing import distribution
    from adversarial_logit_pairing.errors import ConfigError

    monkeypatch.setenv("TF_CONFIG", tf_configs(3)[1])
    workers = distribution.DistributionConfig(strategy="multi_worker")
    assert distribution.apply_legacy_flags(workers, task=1, worker_replicas=3) == workers
    with pytest.raises(ConfigError, match="--worker_replicas=2 disagrees with the 3 workers"):
        distribution.apply_legacy_flags(workers, worker_replicas=2)
    with pytest.raises(ConfigError, match="--task=2 disagrees"):
        distribution.apply_legacy_flags(workers, task=2)
    tpu = distribution.DistributionConfig(strategy="tpu")
    assert distribution.apply_legacy_flags(tpu, master="grpc://10.0.0.1:8470").tpu == \
        "grpc://10.0.0.1:8470"


@pytest.mark.parametrize(
    "config,culprit",
    [
        (dict(strategy="multi_worker"), "TF_CONFIG"),
        (dict(cpu_devices=2), "--cpu_devices=2 goes with --strategy=mirrored"),
        (dict(strategy="tpu"), "--tpu="),
        # With a valid TF_CONFIG, so that the timeout check is the one that fires.
        (dict(strategy="multi_worker", worker_timeout_secs=0),
         r"^--worker_timeout_secs=0(\.0)?: must be > 0$"),
    ],
)
def test_strategy_flags_that_do_not_fit_are_refused_before_tensorflow_starts(
        monkeypatch, config, culprit):
    from adversarial_logit_pairing import distribution
    from adversarial_logit_pairing.errors import ConfigError

    if "worker_timeout_secs" in config:
        monkeypatch.setenv("TF_CONFIG", tf_configs(2)[0])
    else:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=culprit):
        distribution.create_strategy(distribution.DistributionConfig(**config))


def test_without_tensorflow_internals_multi_worker_start_up_falls_back_with_a_warning(
        monkeypatch, caplog):
    from tensorflow.compiler.xla.tsl import protobuf as tsl_protobuf

    from adversarial_logit_pairing import distribution

    # A TensorFlow where the internal module moved: importing it fails.
    monkeypatch.delattr(tsl_protobuf, "coordination_config_pb2", raising=False)
    monkeypatch.setitem(sys.modules,
                        "tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2", None)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": ["localhost:12345", "localhost:12346"]}))
    with caplog.at_level("WARNING"):
        assert distribution._configure_coordination(resolver, 5.0) is False
    assert "lacks the internal coordination API" in caplog.text
    assert "docs/DISTRIBUTED.md" in caplog.text


def test_learning_rate_scale_follows_the_replicas_in_sync():
    from adversarial_logit_pairing import training
    from adversarial_logit_pairing.errors import ConfigError

    assert training.learning_rate_replicas(1, 1) == 1
    assert training.learning_rate_replicas(1, 4) == 4  # one device: the original flag
    assert training.learning_rate_replicas(8, 1) == 8
    assert training.learning_rate_replicas(8, 8) == 8
    with pytest.raises(ConfigError, match="--replicas_to_aggregate=4: .* 8 replicas"):
        training.learning_rate_replicas(8, 4)


# ---- XLA --------------------------------------------------------------------------------------

def _xla_batch():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.uniform(-1, 1, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)), tf.float32)
    return images, tf.constant(rng.integers(0, NUM_CLASSES, BATCH))


def _assert_close_states(state, reference, before):
    """Every variable within float tolerance (XLA fuses and reorders the arithmetic)."""
    assert set(state) == set(reference)
    for name, value in reference.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
        if name.endswith(("/weights", "/RMSProp", "/ExponentialMovingAverage", "moving_mean")):
            assert not np.array_equal(value, before[name]), name  # the step moved it


def test_xla_training_step_matches_the_plain_step_from_the_same_state():
    """Clean training (no random start): the compiled step is the plain step's computation."""
    from adversarial_logit_pairing import training

    hparams = _hparams("clean").parse("train_lp_weight=0.5")  # clean logit pairing
    strategy = tf.distribute.get_strategy()
    images, labels = _xla_batch()
    runs = {}
    for jit_compile in (True, False):
        # The same seeded initial state each time.
        state = _build(strategy, hparams, 1, sync_bn=False)
        step = training.make_train_step(strategy, state.model, state.trainable, state.optimizer,
                                        state.ema, state.global_step, hparams, NUM_CLASSES,
                                        BOUNDS, seed=SEED, jit_compile=jit_compile)
        before = _state(state)
        outputs = [step(images, labels) for _ in range(2)]
        runs[jit_compile] = before, _state(state), outputs
    (before, xla, xla_outputs), (_, plain, plain_outputs) = runs[True], runs[False]
    assert int(xla["global_step"]) == 2
    for compiled, reference in zip(xla_outputs, plain_outputs):
        assert set(compiled) == set(reference)
        for name in reference:
            np.testing.assert_allclose(float(compiled[name]), float(reference[name]),
                                       rtol=1e-5, err_msg=name)
    _assert_close_states(xla, plain, before)


def test_xla_training_step_with_attack_compiles_and_trains_on_its_adversarial_examples():
    """The whole ALP step under XLA against a plain step on the adversarial images it made.

    XLA draws the stateless random start from another generator than the CPU kernels, so the
    attack's output is not compared with the plain step's; the compiled step's adversarial
    batch (all of it, as summary images) must be in the eps box, and the training half of
    the step (loss, gradients, update, moving averages) must match a plain one fed with it.
    """
    from adversarial_logit_pairing import training

    hparams = _hparams(ALP_METHOD)
    strategy = tf.distribute.get_strategy()
    images, labels = _xla_batch()
    state = _build(strategy, hparams, 1, sync_bn=False)
    step = training.make_train_step(strategy, state.model, state.trainable, state.optimizer,
                                    state.ema, state.global_step, hparams, NUM_CLASSES, BOUNDS,
                                    seed=SEED, num_summary_images=BATCH, jit_compile=True)
    # The whole step (PGD loop, forward, backward, update, moving average) lowers to one HLO
    # module: XLA accepted every op.
    hlo = step.experimental_get_compiler_ir(images, labels)(stage="hlo")
    assert "HloModule" in hlo and "while" in hlo
    before = _state(state)
    outputs = step(images, labels)
    compiled = _state(state)
    adv = outputs["adv_images"]
    assert adv.shape == images.shape
    eps = 16 * 2.0 / 255
    assert np.abs(adv.numpy() - images.numpy()).max() <= eps + 1e-6
    assert np.abs(adv.numpy() - images.numpy()).mean() > eps / 4  # moved, not the clean batch

    plain = _build(strategy, hparams, 1, sync_bn=False)
    model, trainable, global_step, optimizer, ema = (
        plain.model, plain.trainable, plain.global_step, plain.optimizer, plain.ema)
    one_hot = tf.one_hot(tf.concat([labels, labels], 0), NUM_CLASSES)
    with tf.GradientTape() as tape:
        logits = model(tf.concat([images, adv], 0), is_training=True)
        losses = training.alp_losses(logits, one_hot, trainable, hparams)
    grads = tape.gradient(losses["total_loss"], trainable)
    optimizer.apply_gradients(list(zip(grads, trainable)), global_step)
    ema.apply(global_step)
    for name in ("total_loss", "loss_xent", "loss_lp", "loss_wd"):
        np.testing.assert_allclose(float(outputs[name]), float(losses[name]), rtol=1e-5,
                                   err_msg=name)
    _assert_close_states(compiled, _state(plain), before)


def _op_types(make_dataset: Callable[[], tf.data.Dataset]) -> set:
    """Op types of the input pipeline ``make_dataset`` builds: what a TPU host would run.

    The pipeline is built while tracing a tf.function, whose public GraphDef then holds its
    dataset ops and (in the function library) the map functions' ops.
    """
    @tf.function
    def first_batch():
        return next(iter(make_dataset()))

    graph = first_batch.get_concrete_function().graph.as_graph_def()
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def test_training_input_pipeline_has_static_shapes_and_no_python_callbacks(tmp_path):
    from adversarial_logit_pairing.datasets import dataset_factory

    write_tiny_imagenet_tfrecords(str(tmp_path), num_train=8, num_val=8, image_size=32, seed=2)

    def make_dataset():
        return dataset_factory.get_dataset("tiny_imagenet", "train", 4, 32, is_training=True,
                                           data_dir=str(tmp_path))[0]

    images, labels = make_dataset().element_spec
    assert images.shape.as_list() == [4, 32, 32, 3] and labels.shape.as_list() == [4]
    ops = _op_types(make_dataset)
    assert "ParseExampleV2" in ops or "ParseSingleExample" in ops  # the real pipeline
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


# ---- The mirrored experiment's results -----------------------------------------------------------

@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, tiny_data):
    out = str(tmp_path_factory.mktemp("mirrored") / "runs")
    summary, states = run_experiment("tests.test_distributed_training", out, tiny_data)
    return summary, states, out


def _assert_states_close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=2e-4, atol=2e-6,
                                   err_msg=name)


@pytest.mark.slow
def test_mirrored_with_sync_batch_norm_matches_one_device_on_the_global_batch(mirrored):
    summary, states, _ = mirrored
    np.testing.assert_allclose(summary["mirrored_sync_clean"]["losses"],
                               summary["single_clean"]["losses"], rtol=1e-5)
    _assert_states_close(states["mirrored_sync_clean"], states["single_clean"])
    assert int(states["mirrored_sync_clean"]["global_step"]) == STEPS
    # Synchronised statistics: every replica's copy of the moving statistics is the same.
    assert summary["mirrored_sync_clean"]["replica_spread"] < 1e-6
    # Two replicas double the learning rate, as --replicas_to_aggregate=2 did.
    np.testing.assert_allclose(summary["mirrored_sync_clean"]["learning_rates"], 2 * 0.045)


@pytest.mark.slow
def test_mirrored_alp_with_per_replica_batch_norm_matches_a_per_replica_reference(mirrored):
    summary, states, _ = mirrored
    np.testing.assert_allclose(summary["mirrored_alp"]["losses"],
                               summary["reference_alp"]["losses"], rtol=1e-5)
    _assert_states_close(states["mirrored_alp"], states["reference_alp"])
    # Per-replica statistics: the replicas' copies of the moving statistics differ.
    assert summary["mirrored_alp"]["replica_spread"] > 1e-6
    # ... and they differ from synchronised ones (the global batch's statistics).
    name = f"{MODEL}/postnorm/moving_mean"
    assert not np.allclose(states["mirrored_alp"][name], states["mirrored_sync_clean"][name])


@pytest.mark.slow
def test_mirrored_evaluation_counts_the_same_examples_as_one_device(mirrored):
    summary, _, out = mirrored
    single, mirrored_eval = summary["eval"]["single"], summary["eval"]["mirrored"]
    assert single["num_examples"] == mirrored_eval["num_examples"] == 16
    assert mirrored_eval["accuracy"] == single["accuracy"]
    assert mirrored_eval["top5"] == single["top5"]
    one, two = np.load(out + "_single.npz"), np.load(out + "_mirrored.npz")
    # The replicas' halves are put back in order: the same examples, the same logits.
    np.testing.assert_array_equal(two["labels"], one["labels"])
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-5, atol=1e-5)
    attacked = np.load(out + "_mirrored_pgd.npz")
    assert attacked["logits"].shape == (16, 200)
    assert not np.allclose(attacked["logits"], one["logits"])
    assert summary["eval"]["mirrored_pgd"]["num_examples"] == 16


# ---- Several workers --------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(count: int) -> list[str]:
    """TF_CONFIG of each of ``count`` workers on 127.0.0.1 (worker 0 is the chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(count)]


def _start_workers(tmp_path, name: str, flags: list[str]) -> list:
    configs = tf_configs(2)
    workers = []
    try:
        for i, config in enumerate(configs):
            log = tmp_path / f"{name}{i}.log"
            workers.append(
                (start(program("train.py", *flags), log, env={"TF_CONFIG": config}), log))
    except BaseException:
        kill_all([process for process, _ in workers])  # never leave the first one running
        raise
    return workers


@pytest.mark.slow
def test_two_workers_train_alp_and_only_the_chief_writes(tmp_path, tiny_data):
    out = tmp_path / "train"
    flags = [f"--output_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}", *MODEL_FLAGS, ALP,
             "--max_steps=3", "--save_model_steps=2", "--save_summaries_steps=1",
             "--strategy=multi_worker", "--worker_timeout_secs=120"]
    logs = finish_all(_start_workers(tmp_path, "worker", flags), 400)
    assert logged_steps(logs[0]) == logged_steps(logs[1]) == [1, 2, 3]
    # Losses are averaged over all replicas, so every worker logs the same numbers.
    losses = [[line.split("total_loss = ")[1].split()[0] for line in log.splitlines()
               if "total_loss = " in line] for log in logs]
    assert losses[0] == losses[1]

    prefix = tf.train.latest_checkpoint(str(out))
    assert prefix.endswith("model.ckpt-3")
    values = checkpoint_values(prefix)
    assert int(values["global_step"]) == 3
    weight = f"{MODEL}/logits/weights"
    assert {weight, weight + "/ExponentialMovingAverage", weight + "/RMSProp"} <= set(values)
    assert not np.allclose(values[weight], checkpoint_values(str(out / "model.ckpt-0"))[weight])
    # Only the chief wrote: one events file, no worker directory left behind.
    assert len(tf.io.gfile.glob(str(out / "events.out.tfevents.*"))) == 1
    assert not [p for p in os.listdir(out) if p.startswith(("workertemp", ".tmp-"))]
    # Two replicas in sync double the learning rate (0.045 -> 0.09), as replicas_to_aggregate.
    rates = scalar_events(out, "learning_rate")
    assert sorted(rates) == [1, 2, 3]
    np.testing.assert_allclose(list(rates.values()), 0.09, rtol=1e-6)


@pytest.mark.slow
def test_a_worker_whose_peers_never_start_stops_with_an_error(tmp_path, tiny_data):
    log_path = tmp_path / "alone.log"
    alone = start(program("train.py", f"--output_dir={tmp_path / 'train'}",
                          f"--tiny_imagenet_data_dir={tiny_data}", *MODEL_FLAGS, ALP,
                          "--max_steps=1", "--strategy=multi_worker", "--worker_timeout_secs=5"),
                  log_path, env={"TF_CONFIG": tf_configs(2)[0]})
    try:
        log = finish(alone, log_path, 120)
    finally:
        kill_all([alone])
    assert alone.returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1 and "did not all join within --worker_timeout_secs=5" in errors[0]
    assert "missing: /job:worker/replica:0/task:1" in errors[0]


# Steps of the runs a worker's death cuts short: the kill lands after step 5, far from the
# end, and a restart's steps to the end are few (each is a collective between processes).
KILLED_RUN_STEPS = 40


def _kill_one_of_two_workers(tmp_path, tiny_data, victim: int):
    """Two workers train (up to KILLED_RUN_STEPS); after the first checkpoint worker ``victim``
    is SIGKILLed. Returns the output dir, the flags, and the survivor's exit status and error
    lines.
    """
    out = tmp_path / "train"
    flags = [f"--output_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}", *MODEL_FLAGS, ALP,
             f"--max_steps={KILLED_RUN_STEPS}", "--save_model_steps=5",
             "--save_summaries_steps=0", "--strategy=multi_worker", "--worker_timeout_secs=120"]
    workers = _start_workers(tmp_path, "first", flags)
    dead, (survivor, survivor_log) = workers[victim][0], workers[1 - victim]
    try:
        wait_for(lambda: (latest_step(out) or 0) >= 5, 300, "a checkpoint after step 0",
                 workers)
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        # The coordination service's heartbeats notice the death within seconds: never a
        # silent hang.
        log = finish(survivor, survivor_log, 120)
    finally:
        kill_all([process for process, _ in workers])
    errors = [line for line in log.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1, log[-3000:]
    return out, flags, survivor.returncode, errors[0]


@pytest.mark.slow
def test_a_dead_worker_stops_the_chief_with_an_error_and_a_restart_resumes(tmp_path, tiny_data):
    out, flags, status, error = _kill_one_of_two_workers(tmp_path, tiny_data, victim=1)
    assert status != 0
    assert "lost contact with another worker" in error and "restart every worker" in error
    resumed = latest_step(out)
    assert resumed < KILLED_RUN_STEPS

    logs = finish_all(_start_workers(tmp_path, "second", flags), 400)
    assert f"Resuming from {out}/model.ckpt-{resumed}" in logs[0]
    assert logged_steps(logs[0]) == list(range(resumed + 1, KILLED_RUN_STEPS + 1))
    assert int(checkpoint_values(tf.train.latest_checkpoint(str(out)))["global_step"]) == (
        KILLED_RUN_STEPS)
    assert read_log(tmp_path / "second1.log")  # the restarted worker ran too


@pytest.mark.slow
def test_a_dead_chief_stops_the_other_worker_with_an_error(tmp_path, tiny_data):
    out, _, status, error = _kill_one_of_two_workers(tmp_path, tiny_data, victim=0)
    assert status != 0
    assert "lost contact with another worker" in error and "restart every worker" in error
    # The chief's last checkpoint is complete: a restart would resume from it.
    assert int(checkpoint_values(tf.train.latest_checkpoint(str(out)))["global_step"]) >= 5


if __name__ == "__main__":
    if sys.argv[1:2] == ["mirrored"] and len(sys.argv) == 4:
        mirrored_experiment(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python -m tests.test_distributed_training mirrored OUT DATA_DIR "
                         f"(got {sys.argv[1:]})")
