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
import shutil
import tempfile
import time

from absl import logging

from dplg_tf.errors import UserError
from dplg_tf.storage.atomic import atomic_path, write_atomic


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, data that does not fit the config)."""


# --------------------------------------------------------------- strategy

def make_strategy(kind="auto", cpu_devices=1):
    """The tf.distribute strategy for `kind`: auto | mirrored | multiworker."""
    import tensorflow as tf

    if kind not in ("auto", "mirrored", "multiworker"):
        raise UserError(f"--strategy={kind!r} is unknown; use auto, mirrored or multiworker.")
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


# --------------------------------------------------------------- trainer

class Trainer:
    """Builds everything in the strategy's scope and runs the loop."""

    def __init__(self, config, workdir, strategy):
        import keras

        from dplg_tf.nn.model import validate
        from dplg_tf.data import pipeline

        validate(config)
        self.config, self.workdir, self.strategy = config, workdir, strategy
        self._read_data()
        t = config.train
        self.max_steps = t.max_steps or t.epochs * self.steps_per_epoch
        # MultiWorkerMirroredStrategy: only the chief writes the real checkpoint and summaries
        self.chief = strategy.extended.should_checkpoint
        if t.mixed_precision:
            keras.mixed_precision.set_global_policy(t.mixed_precision)
        keras.utils.set_random_seed(t.seed)
        self._build()
        self.train_data = pipeline.distributed_dataset(
            strategy, config.data.train_pattern, config.data, True, self.global_batch,
            seed=t.seed)

    def _read_data(self):
        from dplg_tf.data import pipeline

        d, t = self.config.data, self.config.train
        if not d.train_pattern:
            raise UserError("config.data.train_pattern is empty; point it at the "
                             "train-* shards of dplg-build-tfrecords.")
        loss = self.config.loss
        if loss.num_classes and d.num_train_records:  # given: the shards are not read for them
            self.num_classes, self.num_train = loss.num_classes, d.num_train_records
        else:  # dataset_info.json, or counted from the records once (DELG's shards)
            info = pipeline.dataset_info(d.train_pattern)
            self.num_classes = info["num_classes"]
            self.num_train = info["splits"][pipeline.split_of(d.train_pattern)]["num_records"]
        if loss.num_classes and loss.num_classes != self.num_classes:
            raise UserError(
                f"config.loss.num_classes={loss.num_classes} but the training data "
                f"has {self.num_classes} classes; set it to {self.num_classes} or 0.")
        loss.num_classes = self.num_classes  # recorded in workdir/config.json
        self.global_batch = t.batch_size
        replicas = self.strategy.num_replicas_in_sync
        if self.global_batch % replicas:
            raise UserError(f"config.train.batch_size={self.global_batch} is not a multiple "
                             f"of the {replicas} replicas.")
        self.per_replica_batch = self.global_batch // replicas
        self.steps_per_epoch = max(1, self.num_train // self.global_batch)

    def _build(self):
        import tensorflow as tf

        from dplg_tf.nn.model import build_training_model
        from dplg_tf.training.optim import build_train_step, freeze_batchnorm, make_optimizer

        t = self.config.train
        with self.strategy.scope():
            self.model = build_training_model(self.config, self.num_classes)
            if t.frozen_batchnorm:
                freeze_batchnorm(self.model)
            self.optimizer = make_optimizer(self.config, self.model, self.max_steps)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                         step=self.step)
        folder = os.path.join(self.workdir, "checkpoints")
        self.scratch = None
        if not self.chief:  # other workers write to a scratch copy, as TF asks; removed at the end
            folder = self.scratch = tempfile.mkdtemp(prefix="dplg_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(checkpoint, folder,
                                                  max_to_keep=t.keep_checkpoints)
        self.embedder = self.model.get_layer("dplg")
        self._gem_p = self.embedder.get_layer("global_gem").p
        self.train_step = build_train_step(self.strategy, self.model, self.optimizer, t,
                                           self.global_batch, self.step)

    def learning_rate(self):
        import keras

        opt = self.optimizer.inner_optimizer if isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer) else self.optimizer
        return float(opt.learning_rate)

    def validation_accuracy(self, writer=None):
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
        if writer is not None:
            step = int(self.step.numpy())
            writer.scalars(step, {"accuracy": correct / total, **self._fusion(first[0])})
            writer.attention(step, *first, max_outputs=t.summary_images)
        return correct / total

    def _fusion(self, images):
        """fusion/attention_entropy and fusion/local_to_global_norm of a batch
        (dplg_tf.training.diagnostics), for the heads that fuse a local vector."""
        from dplg_tf.training.diagnostics import fusion_probe, fusion_stats

        if not hasattr(self, "_probe"):
            self._probe = fusion_probe(self.embedder)
        if self._probe is None:
            return {}
        stats = fusion_stats(self._probe, images)
        logging.info("fusion: attention entropy %.3f (1 = uniform), |Vl| / |V'g| %.3f",
                     stats["attention_entropy"], stats["local_to_global_norm"])
        return {f"fusion/{k}": v for k, v in stats.items()}

    # -- the loop
    def run(self):
        from dplg_tf.training.summaries import MetricWriter

        start_step = self._restore()
        self.writers = (MetricWriter(self.workdir, "train", self.chief),
                        MetricWriter(self.workdir, "validation", self.chief))
        if self.chief:
            write_atomic(os.path.join(self.workdir, "config.json"),
                         self.config.to_json_best_effort(indent=1))
        try:
            history, rate = self._loop(start_step)
            return self._finish(start_step, history, rate)
        finally:
            if self.scratch:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _restore(self):
        restored = self.manager.restore_or_initialize()
        start_step = int(self.step.numpy())
        if restored and self.manager.latest_checkpoint:
            logging.info("resumed from %s at step %d", self.manager.latest_checkpoint, start_step)
        logging.info("strategy %s: %d replicas, global batch %d, per-replica batch %d; "
                     "%d training images, %d classes, %d steps/epoch, max_steps %d",
                     _strategy_name(self.strategy), self.strategy.num_replicas_in_sync,
                     self.global_batch, self.per_replica_batch, self.num_train,
                     self.num_classes, self.steps_per_epoch, self.max_steps)
        return start_step

    def _loop(self, start_step):
        """Runs the steps; returns the checked (step, loss) history and the
        images/s after the first logging window (compilation excluded)."""
        t = self.config.train
        profile = _profile_window(self.config.profile_steps) if self.chief else None
        iterator = iter(self.train_data)
        history, pending = [], None
        clock = _Clock(start_step)
        step = start_step
        while step < self.max_steps:
            _profiler(profile, step, self.workdir, start=True)
            outputs = self.train_step(iterator)
            step += 1
            # read the previous step's numbers only now, so that this step is
            # already queued and the device never waits for the host
            if pending is not None:
                history.append(self._checked(*pending))
            pending = (step, outputs)
            _profiler(profile, step, self.workdir, start=False)
            logs = step % t.log_every == 0 or step == self.max_steps
            saves = step % t.checkpoint_every == 0 and step < self.max_steps
            evals = bool(t.eval_every) and step % t.eval_every == 0 and step < self.max_steps
            if logs or saves or evals:
                history.append(self._checked(*pending))
                pending = None
            if logs:
                self._log(step, history[-1], clock.lap(step))
            if saves:
                self.manager.save(checkpoint_number=step)
            if evals:
                acc = self.validation_accuracy(self.writers[1])
                if acc is not None:
                    logging.info("step %d validation accuracy %.4f", step, acc)
        return history, clock.steady_rate(self.global_batch)

    def _checked(self, step, outputs):
        """(step, loss, accuracy, gradient norm) as floats; stops on non-finite values."""
        loss, correct, grad_norm = (float(v) for v in outputs)
        # with float16 loss scaling an overflowed gradient is expected (the step
        # is skipped and the scale lowered); only the loss must stay finite then
        norm_ok = math.isfinite(grad_norm) or self.config.train.mixed_precision == "mixed_float16"
        if not (math.isfinite(loss) and norm_ok):
            raise TrainingError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                f"at step {step} (loss={loss}, gradient norm={grad_norm}); "
                f"stopped without saving it: the last good checkpoint is "
                f"{self.manager.latest_checkpoint or 'none'}. Lower "
                "config.train.learning_rate or set config.train.clip_norm.")
        return step, loss, correct / self.global_batch, grad_norm

    def _log(self, step, checked, steps_per_sec):
        _, loss, accuracy, grad_norm = checked
        lr = self.learning_rate()
        images_per_sec = steps_per_sec * self.global_batch
        logging.info("step %d/%d loss %.4f acc %.3f lr %.5f |g| %.3f %.2f steps/s %.1f img/s",
                     step, self.max_steps, loss, accuracy, lr, grad_norm, steps_per_sec,
                     images_per_sec)
        self.writers[0].scalars(step, {
            "loss": loss, "accuracy": accuracy, "learning_rate": lr,
            "gradient_norm": grad_norm, "gem_p": float(self._gem_p.numpy()),
            "steps_per_sec": steps_per_sec, "images_per_sec": images_per_sec})

    def _finish(self, start_step, history, rate):
        step = int(self.step.numpy())
        self.manager.save(checkpoint_number=step)
        acc = self.validation_accuracy(self.writers[1])
        result = {"step": step, "start_step": start_step, "max_steps": self.max_steps,
                  "replicas": self.strategy.num_replicas_in_sync,
                  "global_batch": self.global_batch,
                  "per_replica_batch": self.per_replica_batch,
                  "first_loss": history[0][1] if history else None,
                  "last_loss": history[-1][1] if history else None,
                  "losses": [round(h[1], 5) for h in history],
                  "images_per_sec": rate,
                  "validation_accuracy": acc}
        if self.chief:  # each file whole or not at all: export falls back to checkpoints
            path = os.path.join(self.workdir, "model.keras")
            with atomic_path(path) as tmp:
                self.embedder.save(tmp)
            result["model"] = path
            write_atomic(os.path.join(self.workdir, "result.json"), json.dumps(result, indent=1))
        for w in self.writers:
            w.flush()
        logging.info("done at step %d: loss %s -> %s, validation accuracy %s", step,
                     result["first_loss"], result["last_loss"], acc)
        return result


class _Clock:
    """Steps/s per logging window, and over all windows after the first."""

    def __init__(self, step):
        self.window = (time.perf_counter(), step)
        self.steady = None

    def lap(self, step):
        now = time.perf_counter()
        start, first = self.window
        self.window = (now, step)
        if self.steady is None:
            self.steady = (now, step)  # the first window holds the compilation
        return (step - first) / max(now - start, 1e-9)

    def steady_rate(self, batch):
        if self.steady is None or self.window[1] == self.steady[1]:
            return None
        steps = self.window[1] - self.steady[1]
        return round(steps * batch / max(self.window[0] - self.steady[0], 1e-9), 2)


def _profiler(window, step, workdir, start):
    import tensorflow as tf

    if window and start and step == window[0]:
        tf.profiler.experimental.start(os.path.join(workdir, "train"))
    elif window and not start and step == window[1]:
        tf.profiler.experimental.stop()


def _profile_window(spec):
    if not spec:
        return None
    try:
        first, last = (int(v) for v in str(spec).split(","))
    except ValueError:
        raise UserError(f"config.profile_steps={spec!r} must be 'first,last', "
                         "e.g. '20,25'.") from None
    if not 0 <= first < last:
        raise UserError(f"config.profile_steps={spec!r} needs 0 <= first < last.")
    return first, last


def train(config, workdir, strategy_kind="auto", cpu_devices=1):
    os.makedirs(workdir, exist_ok=True)
    strategy = make_strategy(strategy_kind, cpu_devices)
    return Trainer(config, workdir, strategy).run()


# --------------------------------------------------------------------- CLI
