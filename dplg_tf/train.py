"""dplg-train: the DPLG trainer on tf.distribute.

    dplg-train --config=configs/demo_cpu.py --workdir=runs/demo \
        --config.data.train_pattern=shards/train-* --config.train.max_steps=300

- Strategy: MirroredStrategy over the visible GPUs (or the CPU, split into
  --cpu_devices logical devices), MultiWorkerMirroredStrategy when TF_CONFIG
  is set; --strategy forces one. The loss of each replica is its summed
  per-example loss over the global batch, so the all-reduced gradient is the
  gradient of the global-batch mean.
- SGD with momentum, cosine decay with linear warm-up, decoupled weight decay
  that skips BatchNorm, biases and GeM p, clipping by the global norm of the
  all-reduced gradient, optional mixed precision and XLA for the
  forward/backward pass.
- Checkpoints (tf.train.CheckpointManager) every train.checkpoint_every steps
  and at the end; TF writes a checkpoint under temporary names and renames
  it, then updates the index atomically, so a kill at any moment leaves the
  previous checkpoint restorable. A restart in the same workdir resumes at
  the saved step with the same learning-rate schedule.
- A non-finite loss or gradient stops the run naming the step; no checkpoint
  is written after it.
- TensorBoard in workdir/train and workdir/validation: loss, accuracy,
  learning rate, gradient norm, GeM p, steps/s, images/s, validation
  accuracy and attention maps of a fixed validation batch; a profiler trace
  for config.profile_steps ("first,last").
- At the end: workdir/model.keras, the descriptor model that dplg-export reads.
"""

import json
import math
import os
import sys
import tempfile
import time

from absl import flags, logging
from ml_collections import config_flags

from dplg_tf import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, data that does not fit the config)."""


# --------------------------------------------------------------- strategy

def make_strategy(kind="auto", cpu_devices=1):
    """The tf.distribute strategy for `kind`: auto | mirrored | multiworker."""
    import tensorflow as tf

    if kind not in ("auto", "mirrored", "multiworker"):
        raise ValueError(f"--strategy={kind!r} is unknown; use auto, mirrored or multiworker.")
    if kind == "multiworker" or (kind == "auto" and os.environ.get("TF_CONFIG")):
        if not os.environ.get("TF_CONFIG") and kind == "multiworker":
            logging.warning("no TF_CONFIG: MultiWorkerMirroredStrategy runs as one worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def _strategy_name(strategy):
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


# -------------------------------------------------------------- optimiser

def learning_rate_schedule(t, max_steps):
    """Cosine decay from t.learning_rate to 0 over max_steps, after a linear warm-up."""
    import keras

    if t.lr_schedule != "cosine":
        raise ValueError(f"config.train.lr_schedule={t.lr_schedule!r} is unknown; use 'cosine'.")
    warmup = min(t.warmup_steps, max(0, max_steps - 1))
    decay = max(1, max_steps - warmup)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay, alpha=0.0, warmup_target=t.learning_rate, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(t.learning_rate, decay, alpha=0.0)


def no_decay_variables(model):
    """BatchNorm parameters, biases and GeM p: excluded from weight decay."""
    import keras

    from dplg_tf.layers import GeM

    skip = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.BatchNormalization, GeM)):
            skip += list(layer.trainable_variables)
    skip += [v for v in model.trainable_variables if v.name == "bias"]
    return skip


def make_optimizer(config, model, max_steps):
    """SGD (momentum, decoupled weight decay) for gradients the trainer has
    already summed over replicas and clipped by their true global norm.

    Keras clips each replica's partial gradient before its own all-reduce,
    which is not clipping by the global norm; so the trainer reduces and
    clips, and the optimiser skips its all-reduce.
    """
    import keras

    class PreReducedSGD(keras.optimizers.SGD):
        def _all_reduce_sum_gradients(self, grads_and_vars):
            return list(grads_and_vars)

    t = config.train
    if t.optimizer != "sgd":
        raise ValueError(f"config.train.optimizer={t.optimizer!r} is unknown; use 'sgd'.")
    optimizer = PreReducedSGD(
        learning_rate=learning_rate_schedule(t, max_steps), momentum=t.momentum,
        weight_decay=t.weight_decay or None)
    if t.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    if t.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def freeze_batchnorm(model):
    import keras

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


# ------------------------------------------------------------ summaries

def attention_images(images, attention):
    """Images beside their attention maps (upsampled, red), for TensorBoard."""
    import tensorflow as tf

    size = tf.shape(images)[1:3]
    a = attention[..., None]
    a = a / (tf.reduce_max(a, axis=[1, 2, 3], keepdims=True) + 1e-12)
    heat = tf.image.resize(a, size, method="nearest")
    base = images / 255.0
    overlay = base * 0.4 + tf.concat([heat, tf.zeros_like(heat), tf.zeros_like(heat)], -1) * 0.6
    return tf.clip_by_value(tf.concat([base, overlay], axis=2), 0.0, 1.0)


# ------------------------------------------------------------ the step

def build_train_step(strategy, model, optimizer, t, global_batch, step):
    """The compiled training step: `train_step(iterator) -> (loss, correct, grad_norm)`.

    Per replica: the summed ArcFace loss over the global batch, its gradient
    all-reduced once, clipped by its true global norm, and applied. `t` is
    config.train; `step` a tf.Variable counting steps.
    """
    import tensorflow as tf

    global_batch = float(global_batch)
    nan_step = int(t.debug_nan_step)
    float16 = t.mixed_precision == "mixed_float16"
    clip_norm = float(t.clip_norm or 0.0)

    def forward_backward(images, labels, step_now):
        with tf.GradientTape() as tape:
            out = model([images, labels], training=True)
            per_example = tf.keras.losses.sparse_categorical_crossentropy(
                labels, tf.cast(out["logits"], tf.float32), from_logits=True)
            loss = tf.reduce_sum(per_example) / global_batch
            if nan_step >= 0:  # fault injection for tests of the NaN guard
                loss = loss * tf.where(step_now + 1 == nan_step, float("nan"), 1.0)
            scaled = optimizer.scale_loss(loss) if float16 else loss
        grads = tape.gradient(scaled, model.trainable_variables)  # scaled if float16
        correct = tf.cast(tf.equal(tf.argmax(out["cosine_logits"], -1, output_type=tf.int32),
                                   labels), tf.float32)
        return loss, grads, tf.reduce_sum(correct)

    if t.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels):
        loss, grads, correct = forward_backward(images, labels, step)
        grads = tf.distribute.get_replica_context().all_reduce("SUM", grads)
        scale = tf.cast(optimizer.dynamic_scale, tf.float32) if float16 else None
        if float16:
            grads = [g / scale for g in grads]
        grad_norm = tf.linalg.global_norm(grads)
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=grad_norm)
        if float16:  # the loss-scale optimiser unscales, and skips overflowed steps
            grads = [g * scale for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, correct, grad_norm

    @tf.function
    def train_step(iterator):
        images, labels = next(iterator)
        loss, correct, norm = strategy.run(replica_step, args=(images, labels))
        step.assign_add(1)
        # every replica holds the same (all-reduced) gradient norm
        return (strategy.reduce("SUM", loss, axis=None),
                strategy.reduce("SUM", correct, axis=None),
                strategy.reduce("MEAN", norm, axis=None))

    return train_step


# --------------------------------------------------------------- trainer

class Trainer:
    """Builds everything in the strategy's scope and runs the loop."""

    def __init__(self, config, workdir, strategy):
        import keras
        import tensorflow as tf

        from dplg_tf.config import validate
        from dplg_tf.data import pipeline
        from dplg_tf.model import build_training_model

        validate(config)
        self.config, self.workdir, self.strategy = config, workdir, strategy
        d, t = config.data, config.train
        if not d.train_pattern:
            raise ValueError("config.data.train_pattern is empty; point it at the "
                             "train-* shards of dplg-build-tfrecords.")
        info = pipeline.dataset_info(d.train_pattern)
        self.num_classes = info["num_classes"]
        if config.loss.num_classes and config.loss.num_classes != self.num_classes:
            raise ValueError(
                f"config.loss.num_classes={config.loss.num_classes} but the training data "
                f"has {self.num_classes} classes; set it to {self.num_classes} or 0.")
        config.loss.num_classes = self.num_classes  # recorded in workdir/config.json
        self.num_train = pipeline.num_records(d.train_pattern)
        self.global_batch = t.batch_size
        replicas = strategy.num_replicas_in_sync
        if self.global_batch % replicas:
            raise ValueError(f"config.train.batch_size={self.global_batch} is not a multiple "
                             f"of the {replicas} replicas.")
        self.per_replica_batch = self.global_batch // replicas
        self.steps_per_epoch = max(1, self.num_train // self.global_batch)
        self.max_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.chief = is_chief(strategy)
        if t.mixed_precision:
            keras.mixed_precision.set_global_policy(t.mixed_precision)
        keras.utils.set_random_seed(t.seed)

        with strategy.scope():
            self.model = build_training_model(config, self.num_classes)
            if t.frozen_batchnorm:
                freeze_batchnorm(self.model)
            self.optimizer = make_optimizer(config, self.model, self.max_steps)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        if not self.chief:  # other workers write to a scratch copy, as TF asks
            ckpt_dir = tempfile.mkdtemp(prefix="dplg_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir,
                                                  max_to_keep=t.keep_checkpoints)
        self.train_data = pipeline.distributed_dataset(
            strategy, d.train_pattern, d, True, self.global_batch, seed=t.seed)
        self.embedder = self.model.get_layer("dplg")
        self._gem_p = self.embedder.get_layer("global_gem").p
        self._build_steps()

    # -- the compiled step
    def _build_steps(self):
        self.train_step = build_train_step(self.strategy, self.model, self.optimizer,
                                           self.config.train, self.global_batch, self.step)

    def learning_rate(self):
        import keras

        opt = self.optimizer.inner_optimizer if isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer) else self.optimizer
        return float(opt.learning_rate)

    def validate(self, writer):
        """Accuracy over up to train.eval_batches validation batches; attention images."""
        import tensorflow as tf

        from dplg_tf.data import pipeline

        d, t = self.config.data, self.config.train
        if not d.validation_pattern:
            return None
        ds = pipeline.make_dataset(d.validation_pattern, d, False, self.per_replica_batch)
        correct = total = 0
        first = None
        for images, labels in ds.take(t.eval_batches):
            out = self.model([images, labels], training=False)
            pred = tf.argmax(out["cosine_logits"], -1, output_type=tf.int32)
            correct += int(tf.reduce_sum(tf.cast(pred == labels, tf.int32)))
            total += int(labels.shape[0])
            if first is None:
                first = (images[: t.summary_images], out["attention"][: t.summary_images])
        if not total:
            return None
        accuracy = correct / total
        if writer is not None:
            with writer.as_default(step=int(self.step.numpy())):
                tf.summary.scalar("accuracy", accuracy)
                tf.summary.image("attention", attention_images(*first),
                                 max_outputs=t.summary_images)
        return accuracy

    def run(self):
        import tensorflow as tf

        t = self.config.train
        restored = self.manager.restore_or_initialize()
        start_step = int(self.step.numpy())
        if restored and self.manager.latest_checkpoint:
            logging.info("resumed from %s at step %d", self.manager.latest_checkpoint, start_step)
        logging.info("strategy %s: %d replicas, global batch %d, per-replica batch %d; "
                     "%d training images, %d classes, %d steps/epoch, max_steps %d",
                     _strategy_name(self.strategy), self.strategy.num_replicas_in_sync,
                     self.global_batch, self.per_replica_batch, self.num_train,
                     self.num_classes, self.steps_per_epoch, self.max_steps)
        writers = (None, None)
        if self.chief:
            writers = (tf.summary.create_file_writer(os.path.join(self.workdir, "train")),
                       tf.summary.create_file_writer(os.path.join(self.workdir, "validation")))
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.config.to_json_best_effort(indent=1))
        profile = _profile_window(self.config.profile_steps)
        iterator = iter(self.train_data)
        history = []
        window_start, window_steps = time.perf_counter(), 0
        step = start_step
        while step < self.max_steps:
            if profile and step == profile[0] and self.chief:
                tf.profiler.experimental.start(os.path.join(self.workdir, "train"))
            loss, correct, grad_norm = self.train_step(iterator)
            step += 1
            window_steps += 1
            loss_value, norm_value = float(loss), float(grad_norm)
            # with float16 loss scaling an overflowed gradient is expected (the step
            # is skipped and the scale lowered); only the loss must stay finite then
            norm_ok = math.isfinite(norm_value) or t.mixed_precision == "mixed_float16"
            if not (math.isfinite(loss_value) and norm_ok):
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'} "
                    f"at step {step} (loss={loss_value}, gradient norm={norm_value}); "
                    f"stopped without saving it: the last good checkpoint is "
                    f"{self.manager.latest_checkpoint or 'none'}. Lower "
                    "config.train.learning_rate or set config.train.clip_norm.")
            if profile and step == profile[1] and self.chief:
                tf.profiler.experimental.stop()
            accuracy = float(correct) / self.global_batch
            history.append((step, loss_value))
            if step % t.log_every == 0 or step == self.max_steps:
                elapsed = time.perf_counter() - window_start
                steps_per_sec = window_steps / max(elapsed, 1e-9)
                lr = self.learning_rate()
                logging.info("step %d/%d loss %.4f acc %.3f lr %.5f |g| %.3f %.2f steps/s "
                             "%.1f img/s", step, self.max_steps, loss_value, accuracy, lr,
                             norm_value, steps_per_sec, steps_per_sec * self.global_batch)
                if writers[0] is not None:
                    with writers[0].as_default(step=step):
                        tf.summary.scalar("loss", loss_value)
                        tf.summary.scalar("accuracy", accuracy)
                        tf.summary.scalar("learning_rate", lr)
                        tf.summary.scalar("gradient_norm", norm_value)
                        tf.summary.scalar("gem_p", float(self._gem_p.numpy()))
                        tf.summary.scalar("steps_per_sec", steps_per_sec)
                        tf.summary.scalar("images_per_sec", steps_per_sec * self.global_batch)
                window_start, window_steps = time.perf_counter(), 0
            if step % t.checkpoint_every == 0 and step < self.max_steps:
                self.manager.save(checkpoint_number=step)
            if t.eval_every and step % t.eval_every == 0 and step < self.max_steps:
                acc = self.validate(writers[1])
                if acc is not None:
                    logging.info("step %d validation accuracy %.4f", step, acc)
        self.manager.save(checkpoint_number=step)
        acc = self.validate(writers[1])
        result = {"step": step, "start_step": start_step, "max_steps": self.max_steps,
                  "replicas": self.strategy.num_replicas_in_sync,
                  "global_batch": self.global_batch,
                  "per_replica_batch": self.per_replica_batch,
                  "first_loss": history[0][1] if history else None,
                  "last_loss": history[-1][1] if history else None,
                  "losses": [round(v, 5) for _, v in history],
                  "validation_accuracy": acc}
        if self.chief:
            path = os.path.join(self.workdir, "model.keras")
            self.embedder.save(path)
            result["model"] = path
            with open(os.path.join(self.workdir, "result.json"), "w") as f:
                json.dump(result, f, indent=1)
            for w in writers:
                w.flush()
        logging.info("done at step %d: loss %s -> %s, validation accuracy %s", step,
                     result["first_loss"], result["last_loss"], acc)
        return result


def _profile_window(spec):
    if not spec:
        return None
    try:
        first, last = (int(v) for v in str(spec).split(","))
    except ValueError:
        raise ValueError(f"config.profile_steps={spec!r} must be 'first,last', "
                         "e.g. '20,25'.") from None
    if not 0 <= first < last:
        raise ValueError(f"config.profile_steps={spec!r} needs 0 <= first < last.")
    return first, last


def train(config, workdir, strategy_kind="auto", cpu_devices=1):
    os.makedirs(workdir, exist_ok=True)
    strategy = make_strategy(strategy_kind, cpu_devices)
    return Trainer(config, workdir, strategy).run()


# --------------------------------------------------------------------- CLI

def _define_flags():
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.")
    flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and the model.",
                        required=True)
    flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "multiworker"],
                      "auto: MultiWorkerMirrored when TF_CONFIG is set, else Mirrored.")
    flags.DEFINE_integer("cpu_devices", 1,
                         "Without GPUs, split the CPU into this many logical devices.")


def main(argv):
    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    try:
        train(f.config, f.workdir, f.strategy, f.cpu_devices)
    except TrainingError as e:
        print(f"dplg-train: error: {e}", file=sys.stderr)
        sys.exit(3)


def run():
    _define_flags()
    cli.run(main, "dplg-train")


if __name__ == "__main__":
    run()
