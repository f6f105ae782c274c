"""The tf.data plumbing shared by the ImageNet and Tiny ImageNet inputs.

Reading files, shuffling, parallel parsing, batching with a static batch dimension and
prefetching are the same for both data sets; only the record parser and the buffer sizes
differ. Training pipelines repeat forever and give up element order for speed (the original
used ``sloppy=True`` interleaving); evaluation pipelines are finite and deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

# TFRecord read buffer of the original readers.
READ_BUFFER_BYTES = 8 * 1024 * 1024
# Files read at the same time (the original's parallel_interleave cycle_length).
FILES_READ_IN_PARALLEL = 4

ParseFn = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def read_records(filenames: Sequence[str], is_training: bool,
                 shuffle_buffer: int) -> tf.data.Dataset:
    """Serialized records of the given files.

    Training: the file order is reshuffled every epoch, the files are repeated forever,
    read FILES_READ_IN_PARALLEL at a time and interleaved, and the records go through a
    shuffle buffer of ``shuffle_buffer`` records. Evaluation: each record exactly once, in a
    fixed order (files interleaved deterministically), no shuffling.
    """
    files = tf.data.Dataset.from_tensor_slices(list(filenames))
    if is_training:
        files = files.shuffle(len(filenames), reshuffle_each_iteration=True).repeat()

    def read_file(filename: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(filename, buffer_size=READ_BUFFER_BYTES)

    records = files.interleave(
        read_file, cycle_length=FILES_READ_IN_PARALLEL,
        num_parallel_calls=FILES_READ_IN_PARALLEL, deterministic=not is_training,
    )
    if is_training:
        records = records.shuffle(shuffle_buffer)
    return records


def parse_batch_prefetch(records: tf.data.Dataset, parse_fn: ParseFn, batch_size: int,
                         is_training: bool) -> tf.data.Dataset:
    """Parses records in parallel, batches them (dropping the last partial batch) and prefetches.

    Dropping the remainder gives the batch dimension a static size, which TPUs and the
    concatenation of clean and adversarial halves in the training step rely on.
    """
    examples = records.map(parse_fn, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=not is_training)
    batches = examples.batch(batch_size, drop_remainder=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def checked_label(label: tf.Tensor, num_classes: int, feature: str,
                  first_label: int = 0) -> tf.Tensor:
    """Checks ``first_label <= label < first_label + num_classes``; returns ``label - first_label``.

    One-hot encoding silently turns an out-of-range label into an all-zero target, so a bad
    label would train on garbage without any error; the check makes it raise
    InvalidArgumentError like an undecodable image does, naming ``feature`` and the range of
    the STORED values. ``first_label = 1`` maps ImageNet's stored 1..1000 to 0..999 for a
    model without a background class, so a stored 0 is an error there, not class -1.
    """
    last = first_label + num_classes
    check = tf.debugging.Assert(
        tf.logical_and(label >= first_label, label < last),
        [f"{feature} outside [{first_label}, {last}):", label],
    )
    with tf.control_dependencies([check]):
        if first_label == 0:
            return tf.identity(label)
        return label - first_label
