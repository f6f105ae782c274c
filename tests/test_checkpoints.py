"""TF1 name-based checkpoints: names, TF1 readability, atomic latest pointer, strict restore."""

import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints
from adversarial_logit_pairing.errors import CheckpointError, MissingCheckpointError


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "net/conv1/weights": tf.Variable(rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
                                         name="net/conv1/weights"),
        "net/conv1/BatchNorm/moving_mean": tf.Variable(rng.normal(size=(4,)).astype(np.float32),
                                                       name="net/conv1/BatchNorm/moving_mean"),
        "global_step": tf.Variable(7, dtype=tf.int64, name="global_step"),
    }


def test_saved_checkpoint_lists_the_tf1_names(tmp_path):
    prefix = checkpoints.save(_variables(), str(tmp_path), step=7)
    assert os.path.basename(prefix) == "model.ckpt-7"
    names = {name for name, _ in tf.train.list_variables(prefix)}
    assert names == {"net/conv1/weights", "net/conv1/BatchNorm/moving_mean", "global_step"}
    assert checkpoints.latest_checkpoint(str(tmp_path)) == prefix
    assert checkpoints.checkpoint_step(prefix) == 7
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_tf1_saver_restores_our_checkpoint_in_graph_mode(tmp_path):
    values = _variables()
    expected = values["net/conv1/weights"].numpy()
    prefix = checkpoints.save(values, str(tmp_path), step=3)
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("net/conv1/weights", shape=(3, 3, 3, 4))
        step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver([w, step])
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, prefix)
            np.testing.assert_array_equal(sess.run(w), expected)
            assert sess.run(step) == 7


def test_restore_round_trip_and_directory_resolution(tmp_path):
    checkpoints.save(_variables(0), str(tmp_path), step=1)
    second = checkpoints.save(_variables(1), str(tmp_path), step=2)
    target = _variables(5)
    prefix = checkpoints.resolve_checkpoint(str(tmp_path), "--checkpoint_path")
    assert prefix == second
    checkpoints.restore(target, prefix)
    for name, variable in _variables(1).items():
        np.testing.assert_array_equal(target[name].numpy(), variable.numpy())


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 8):
        checkpoints.save(_variables(), str(tmp_path), step=step, max_to_keep=3)
    kept = sorted(p for p in os.listdir(tmp_path) if p.endswith(".index"))
    assert kept == ["model.ckpt-5.index", "model.ckpt-6.index", "model.ckpt-7.index"]


def test_latest_pointer_skips_a_checkpoint_whose_files_are_gone(tmp_path):
    first = checkpoints.save(_variables(), str(tmp_path), step=1)
    second = checkpoints.save(_variables(), str(tmp_path), step=2)
    for path in tf.io.gfile.glob(second + ".*"):
        os.remove(path)
    assert checkpoints.latest_checkpoint(str(tmp_path)) == first


def test_missing_and_mismatched_variables_fail_without_partial_load(tmp_path):
    prefix = checkpoints.save(_variables(0), str(tmp_path), step=1)
    target = _variables(9)
    before = {k: v.numpy().copy() for k, v in target.items()}
    target["net/conv2/weights"] = tf.Variable(tf.zeros([1]))
    target["net/conv1/weights"] = tf.Variable(tf.zeros([3, 3, 3, 8]))
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore(target, prefix)
    message = str(info.value)
    assert "net/conv2/weights" in message and "missing" in message
    assert "net/conv1/weights: checkpoint [3, 3, 3, 4] vs model [3, 3, 3, 8]" in message
    np.testing.assert_array_equal(target["net/conv1/BatchNorm/moving_mean"].numpy(),
                                  before["net/conv1/BatchNorm/moving_mean"])


def test_truncated_data_file_fails_clearly_and_changes_no_variable(tmp_path):
    prefix = checkpoints.save(_variables(0), str(tmp_path), step=1)
    (data_file,) = tf.io.gfile.glob(prefix + ".data-*")
    with open(data_file, "r+b") as f:  # the tensors before the cut stay readable
        f.truncate(os.path.getsize(data_file) - 100)
    target = _variables(9)
    before = {k: v.numpy().copy() for k, v in target.items()}
    with pytest.raises(CheckpointError, match="cannot be read at .*truncated or corrupt"):
        checkpoints.restore(target, prefix)
    for name, variable in target.items():
        np.testing.assert_array_equal(variable.numpy(), before[name])


def test_resolving_a_missing_checkpoint_names_the_flag(tmp_path):
    # A checkpoint error (not a data error) that is also a FileNotFoundError.
    with pytest.raises(MissingCheckpointError, match="--checkpoint_path=.*no checkpoint"):
        checkpoints.resolve_checkpoint(str(tmp_path), "--checkpoint_path")
    with pytest.raises(FileNotFoundError, match="--finetune_checkpoint_path"):
        checkpoints.resolve_checkpoint(str(tmp_path / "nope"), "--finetune_checkpoint_path")


def _model_like(num_classes=10, scope="net"):
    """A few variables named as a Slim classifier's, with a logits head of num_classes."""
    return {
        f"{scope}/conv1/weights": tf.Variable(tf.ones([3, 3, 3, 4])),
        f"{scope}/logits/weights": tf.Variable(tf.ones([1, 1, 4, num_classes])),
        f"{scope}/logits/biases": tf.Variable(tf.ones([num_classes])),
    }


def test_missing_shadows_are_named_as_the_cause(tmp_path):
    prefix = checkpoints.save(_model_like(), str(tmp_path), step=1)
    wanted = {name + checkpoints.EMA_SUFFIX: v for name, v in _model_like().items()}
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore(wanted, prefix)
    message = str(info.value)
    assert "net/conv1/weights/ExponentialMovingAverage [3, 3, 3, 4]" in message
    assert "holds no /ExponentialMovingAverage shadows" in message
    assert "--moving_average_decay=-1" in message
    assert "another model" not in message


def test_a_wider_head_with_the_same_class_count_is_not_called_a_class_count(tmp_path):
    wide = _model_like()
    wide["net/conv1/weights"] = tf.Variable(tf.ones([3, 3, 3, 8]))
    wide["net/logits/weights"] = tf.Variable(tf.ones([1, 1, 8, 10]))
    prefix = checkpoints.save(wide, str(tmp_path), step=1)
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore(_model_like(), prefix, what="eval model",
                            classifier_scopes=("net/logits",))
    message = str(info.value)
    assert "net/logits/weights: checkpoint [1, 1, 8, 10] vs eval model [1, 1, 4, 10]" in message
    assert "classes" not in message


def test_another_class_count_is_named_as_the_cause(tmp_path):
    prefix = checkpoints.save(_model_like(num_classes=1001), str(tmp_path), step=1)
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore(_model_like(num_classes=200), prefix, what="eval model",
                            classifier_scopes=("net/logits",))
    message = str(info.value)
    assert "net/logits/biases: checkpoint [1001] vs eval model [200]" in message
    assert "trained for 1001 classes, the eval model has 200" in message
    assert "--finetune_exclude_pretrained_scopes=net/logits" in message
    assert "\n" not in message


def test_another_model_is_named_as_the_cause(tmp_path):
    prefix = checkpoints.save(_model_like(scope="resnet_v2_101"), str(tmp_path), step=1)
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore(_model_like(scope="resnet_v2_50"), prefix)
    message = str(info.value)
    assert "3 of 3 variables missing: resnet_v2_50/conv1/weights [3, 3, 3, 4]" in message
    assert "another model (scopes resnet_v2_101; the model has resnet_v2_50)" in message


def test_shadow_names_fall_back_to_plain_names_only_without_any_shadow(tmp_path):
    plain_dir, mixed_dir = tmp_path / "plain", tmp_path / "mixed"
    source = _model_like()
    plain = checkpoints.save(source, str(plain_dir), step=1)
    shadowed = dict(source)
    shadowed["net/conv1/weights" + checkpoints.EMA_SUFFIX] = tf.Variable(tf.zeros([3, 3, 3, 4]))
    mixed = checkpoints.save(shadowed, str(mixed_dir), step=1)
    target = {name: tf.Variable(tf.zeros(v.shape)) for name, v in source.items()}
    wanted = {"net/conv1/weights" + checkpoints.EMA_SUFFIX: target["net/conv1/weights"],
              "net/logits/biases": target["net/logits/biases"]}

    assert checkpoints.has_moving_averages(mixed) and not checkpoints.has_moving_averages(plain)
    # A checkpoint with shadows keeps the request as it is.
    assert checkpoints.plain_names_without_shadows(wanted, mixed) == wanted
    mapped = checkpoints.plain_names_without_shadows(wanted, plain)
    assert set(mapped) == {"net/conv1/weights", "net/logits/biases"}
    checkpoints.restore(mapped, plain)
    np.testing.assert_array_equal(target["net/conv1/weights"].numpy(), np.ones([3, 3, 3, 4]))


def _save_without_state_file(prefix):
    """A TF1 Saver checkpoint without the 'checkpoint' file, like an unpacked release."""
    with tf.Graph().as_default():
        variable = tf.compat.v1.get_variable("net/w", initializer=tf.constant([1.0, 2.0]))
        saver = tf.compat.v1.train.Saver([variable])
        with tf.compat.v1.Session() as session:
            session.run(variable.initializer)
            saver.save(session, prefix, write_state=False, write_meta_graph=False)


def test_directory_without_state_file_resolves_to_its_only_checkpoint(tmp_path):
    _save_without_state_file(str(tmp_path / "released.ckpt"))
    assert not (tmp_path / "checkpoint").exists()
    prefix = checkpoints.resolve_checkpoint(str(tmp_path), "--checkpoint_path")
    assert prefix == str(tmp_path / "released.ckpt")
    _save_without_state_file(str(tmp_path / "other.ckpt"))
    with pytest.raises(CheckpointError, match="2 checkpoints .*other.ckpt; released.ckpt"):
        checkpoints.resolve_checkpoint(str(tmp_path), "--checkpoint_path")


def test_leftovers_of_killed_writes_are_removed_and_complete_checkpoints_kept(tmp_path):
    directory = str(tmp_path)
    variables = _variables(0)
    complete = checkpoints.save(variables, directory, step=1)
    # A kill between MergeV2Checkpoints' move of the data file and its index write leaves
    # checkpoint 2's data without an index; a kill before the merge leaves a staging dir.
    interrupted = checkpoints.save(variables, directory, step=2)
    os.remove(interrupted + ".index")
    tf.compat.v1.train.update_checkpoint_state(directory, complete, [complete])  # not moved yet
    staging = tmp_path / ".tmp-model.ckpt-3-0123abcd"
    staging.mkdir()
    (staging / "part.data-00000-of-00001").write_bytes(b"partial")
    checkpoints.remove_stale_temporaries(directory)
    left = sorted(os.listdir(directory))
    assert not [name for name in left if name.startswith(("model.ckpt-2", ".tmp-"))], left
    assert {"model.ckpt-1.index", "model.ckpt-1.data-00000-of-00001"} <= set(left)
    assert tf.train.latest_checkpoint(directory) == complete
    target = _variables(9)
    checkpoints.restore(target, complete)
    np.testing.assert_array_equal(target["net/conv1/weights"].numpy(),
                                  variables["net/conv1/weights"].numpy())
