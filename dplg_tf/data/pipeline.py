"""tf.data input for training and validation from the builder's shards.

`make_dataset(pattern, data_config, training, batch_size)` yields
`(images float32 (B, S, S, 3) in [0, 255], labels int32 (B,))`; the model
does its own preprocessing. Training: files shuffled and read interleaved in
parallel, records shuffled and repeated, a random resized crop decoded
straight from the JPEG (only the crop is decoded), optional flip and colour
jitter. Validation: files in order, centre crop, deterministic. Training
batches drop the remainder so every replica gets the same shape; validation
keeps the last, smaller batch.

`distributed_dataset(strategy, pattern, data_config, training, global_batch)`
gives each replica (and each worker, under MultiWorkerMirroredStrategy) its
own share: per-replica batch = global batch / replicas.
"""

import json
import os

import tensorflow as tf

from dplg_tf.errors import InputNotFound, UserError

AUTOTUNE = tf.data.AUTOTUNE
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def shard_files(pattern):
    """The TFRecord files of `pattern`, sorted; InputNotFound when there are none."""
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise InputNotFound(f"No TFRecord shards match {pattern!r}.")
    return files


def record_batches(pattern, max_images=0, batch_size=16):
    """(encoded images [list of bytes], labels [n]) of the records matching
    `pattern` (dplg-build-tfrecords shards), a batch at a time."""
    files = shard_files(pattern)
    ds = tf.data.TFRecordDataset(files).map(
        lambda r: tf.io.parse_single_example(r, FEATURES))
    if max_images:
        ds = ds.take(max_images)
    empty = True
    for batch in ds.batch(batch_size).as_numpy_iterator():
        empty = False
        yield list(batch["image/encoded"]), batch["image/class/label"]
    if empty:
        raise UserError(f"The shards {pattern!r} hold no records.")


def dataset_info(pattern):
    """{"num_classes", "splits": {split: {"num_records"}}} of the shards of
    `pattern`: the builder's dataset_info.json beside them when it knows the
    split, else (shards of DELG's builder, or any others in the schema)
    counted from the records once and cached beside them."""
    path = os.path.join(os.path.dirname(pattern), "dataset_info.json")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            info = json.load(f)
        if split_of(pattern) in info.get("splits", {}):
            return info
    return _counted(pattern)


def _counted(pattern):
    """Record count and classes (largest label + 1) read from the records."""
    import hashlib

    from absl import logging

    files = shard_files(pattern)
    key = hashlib.sha1("\n".join(f"{f}:{tf.io.gfile.stat(f).length}" for f in files)
                       .encode("utf-8", "surrogateescape")).hexdigest()[:16]
    cache = os.path.join(os.path.dirname(pattern), f".dplg_counts-{key}.json")
    if tf.io.gfile.exists(cache):
        with tf.io.gfile.GFile(cache) as f:
            return json.load(f)
    logging.info("no dataset_info.json for %s: counting its %d shards once", pattern, len(files))
    label = {"image/class/label": FEATURES["image/class/label"]}
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=AUTOTUNE).map(
        lambda r: tf.io.parse_single_example(r, label)["image/class/label"],
        num_parallel_calls=AUTOTUNE).batch(65536)
    count, largest = 0, -1
    for labels in ds.as_numpy_iterator():
        count, largest = count + len(labels), max(largest, int(labels.max()))
    if count == 0 or largest < 0:
        raise UserError(f"The shards {pattern!r} hold no records with labels.")
    info = {"num_classes": largest + 1, "splits": {split_of(pattern): {"num_records": count}},
            "counted_from": pattern}
    try:
        from dplg_tf.storage.atomic import write_atomic

        write_atomic(cache, json.dumps(info))
    except OSError:  # a read-only data folder: counted again next time
        pass
    return info


def split_of(pattern):
    name = os.path.basename(pattern)
    return "validation" if name.startswith("validation") else "train"


def num_records(pattern):
    return dataset_info(pattern)["splits"][split_of(pattern)]["num_records"]


def num_classes(pattern):
    return dataset_info(pattern)["num_classes"]


def _random_crop_window(shape, data_config, seed=None):
    """An Inception/DELG-style crop: area in crop_area_range, aspect in aspect_ratio_range."""
    bbox = tf.zeros((1, 0, 4), tf.float32)  # the whole image
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=bbox, min_object_covered=0.1,
        area_range=tuple(data_config.crop_area_range),
        aspect_ratio_range=tuple(data_config.aspect_ratio_range),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    return tf.stack([offset_y, offset_x, height, width])


def _colour_jitter(image, strength):
    """Brightness, contrast and saturation changes of relative size `strength`."""
    image = image / 255.0
    image = tf.image.random_brightness(image, 0.4 * strength)
    image = tf.image.random_contrast(image, 1 - 0.4 * strength, 1 + 0.4 * strength)
    image = tf.image.random_saturation(image, 1 - 0.4 * strength, 1 + 0.4 * strength)
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def _train_map(data_config):
    size = data_config.image_size

    def fn(record):
        parsed = tf.io.parse_single_example(record, FEATURES)
        encoded = parsed["image/encoded"]
        if data_config.random_resized_crop:
            shape = tf.io.extract_jpeg_shape(encoded)
            window = _random_crop_window(shape, data_config)
            image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
        else:
            image = tf.io.decode_jpeg(encoded, channels=3)
        # antialiased as at extraction; the filter can overshoot [0, 255] slightly
        image = tf.clip_by_value(tf.image.resize(image, (size, size), antialias=True),
                                 0.0, 255.0)
        if data_config.random_flip:
            image = tf.image.random_flip_left_right(image)
        if data_config.colour_jitter > 0:
            image = _colour_jitter(image, data_config.colour_jitter)
        image = tf.ensure_shape(image, (size, size, 3))
        return image, tf.cast(parsed["image/class/label"], tf.int32)

    return fn


def _eval_map(data_config):
    size = data_config.image_size

    def fn(record):
        parsed = tf.io.parse_single_example(record, FEATURES)
        image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = size / tf.reduce_min(shape)
        new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        image = tf.clip_by_value(tf.image.resize(image, new, antialias=True), 0.0, 255.0)
        image = tf.image.resize_with_crop_or_pad(image, size, size)
        image = tf.ensure_shape(image, (size, size, 3))
        return image, tf.cast(parsed["image/class/label"], tf.int32)

    return fn


def make_dataset(pattern, data_config, training, batch_size, input_context=None, seed=None):
    """Batches of (images, labels) from the shards matching `pattern`."""
    files = tf.io.gfile.glob(pattern)
    if not files:
        raise InputNotFound(f"No TFRecord shards match {pattern!r}.")
    workers = input_context.num_input_pipelines if input_context else 1
    if training and len(files) < workers:  # a worker with no file would stop first and
        # leave the others waiting in the all-reduce
        raise UserError(f"{len(files)} shard files match {pattern!r} but {workers} workers "
                        "read them whole; build at least as many shards as workers "
                        "(dplg-build-tfrecords --num_shards).")
    files = tf.data.Dataset.from_tensor_slices(sorted(files))
    if input_context and input_context.num_input_pipelines > 1:
        files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        files = files.shuffle(len(tf.io.gfile.glob(pattern)), seed=seed,
                              reshuffle_each_iteration=True).repeat()
    ds = files.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=data_config.num_parallel_reads, num_parallel_calls=AUTOTUNE,
        deterministic=not training)
    if training:
        ds = ds.shuffle(data_config.shuffle_buffer, seed=seed)
        ds = ds.map(_train_map(data_config), num_parallel_calls=AUTOTUNE,
                    deterministic=False)
    else:
        ds = ds.map(_eval_map(data_config), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    options.deterministic = not training
    options.autotune.enabled = True
    return ds.with_options(options).prefetch(AUTOTUNE)


def distributed_dataset(strategy, pattern, data_config, training, global_batch, seed=None):
    """The dataset split over `strategy`'s replicas (and workers)."""
    if global_batch % strategy.num_replicas_in_sync:
        raise UserError(
            f"The global batch size {global_batch} is not a multiple of the "
            f"{strategy.num_replicas_in_sync} replicas; change config.train.batch_size.")

    def fn(context):
        per_replica = context.get_per_replica_batch_size(global_batch)
        return make_dataset(pattern, data_config, training, per_replica, context, seed)

    return strategy.distribute_datasets_from_function(fn)
