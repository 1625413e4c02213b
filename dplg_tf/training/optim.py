"""The optimiser and the compiled training step of dplg-train.

SGD with momentum, cosine decay with linear warm-up, decoupled weight decay
that skips BatchNorm, biases and GeM p; the step sums the per-replica loss
over the global batch, all-reduces the gradient once, clips it by its true
global norm and applies it.
"""

from dplg_tf.errors import UserError


def peak_learning_rate(t):
    """t.learning_rate, scaled by t.batch_size / t.lr_base_batch when
    t.lr_scaling is "linear" (Goyal et al.'s rule; pair it with a warm-up)."""
    if t.get("lr_scaling", "none") == "linear":
        return t.learning_rate * t.batch_size / t.lr_base_batch
    return t.learning_rate


def learning_rate_schedule(t, max_steps):
    """Cosine decay from the peak rate to 0 over max_steps, after a linear warm-up."""
    import keras

    if t.lr_schedule != "cosine":
        raise UserError(f"config.train.lr_schedule={t.lr_schedule!r} is unknown; use 'cosine'.")
    peak = peak_learning_rate(t)
    warmup = min(t.warmup_steps, max(0, max_steps - 1))
    decay = max(1, max_steps - warmup)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay, alpha=0.0, warmup_target=peak, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(peak, decay, alpha=0.0)


def no_decay_variables(model):
    """BatchNorm parameters, biases and GeM p: excluded from weight decay."""
    import keras

    from dplg_tf.nn.layers import GeM

    skip = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.BatchNormalization, GeM)):
            skip += list(layer.trainable_variables)
    skip += [v for v in model.trainable_variables if v.name == "bias"]
    return skip


def make_optimizer(config, model, max_steps):
    """SGD (momentum; weight decay decoupled, or coupled through the loss by
    build_train_step) for gradients the trainer has already summed over
    replicas and clipped by their true global norm.

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
        raise UserError(f"config.train.optimizer={t.optimizer!r} is unknown; use 'sgd'.")
    decoupled = weight_decay_mode(t) == "decoupled" and t.weight_decay
    optimizer = PreReducedSGD(
        learning_rate=learning_rate_schedule(t, max_steps), momentum=t.momentum,
        weight_decay=t.weight_decay if decoupled else None)
    if decoupled:
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    if t.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def weight_decay_mode(t):
    """config.train.weight_decay_mode: "decoupled" (Keras: w -= lr * wd * w after
    the momentum update) or "coupled" (the L2 term wd/2 |w|^2 in the loss, so
    its gradient goes through the momentum, as in PyTorch's SGD used by DOLG
    and pycls; with momentum 0.9 that decays about 10x more strongly)."""
    mode = t.get("weight_decay_mode", "decoupled")
    if mode not in ("decoupled", "coupled"):
        raise UserError(f"config.train.weight_decay_mode={mode!r} is unknown; use "
                        "'decoupled' or 'coupled'.")
    return mode


def l2_term(model, t, replicas):
    """`() -> wd/2 * sum |w|^2 / replicas` over the decayed variables for the
    coupled mode (each replica's share: the all-reduce sums them), else None."""
    import tensorflow as tf

    if weight_decay_mode(t) != "coupled" or not t.weight_decay:
        return None
    skip = {id(v) for v in no_decay_variables(model)}
    decayed = [v for v in model.trainable_variables if id(v) not in skip]
    factor = 0.5 * float(t.weight_decay) / replicas

    def term():
        return factor * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
                                  for v in decayed])

    return term


def freeze_batchnorm(model):
    import keras

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def backbone_variables(model):
    """The trainable variables of the backbone (the nested keras.Model) of a training model."""
    import keras

    embedder = model.get_layer("dplg")
    nested = [layer for layer in embedder.layers if isinstance(layer, keras.Model)]
    return nested[0].trainable_variables if nested else []


def backbone_gradient_factor(t):
    """step -> the factor of the backbone's gradients (0 while frozen, then the
    multiplier), or None when the backbone trains like the head."""
    frozen = int(t.get("backbone_frozen_steps", 0))
    multiplier = float(t.get("backbone_lr_multiplier", 1.0))
    if frozen == 0 and multiplier == 1.0:
        return None

    def factor(step):
        import tensorflow as tf

        return tf.where(step < frozen, 0.0, multiplier)
    return factor


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
    l2 = l2_term(model, t, strategy.num_replicas_in_sync)
    backbone_factor = backbone_gradient_factor(t)
    in_backbone = {id(v) for v in backbone_variables(model)}
    in_backbone = [id(v) in in_backbone for v in model.trainable_variables]

    def forward_backward(images, labels, step_now):
        with tf.GradientTape() as tape:
            out = model([images, labels], training=True)
            per_example = tf.keras.losses.sparse_categorical_crossentropy(
                labels, tf.cast(out["logits"], tf.float32), from_logits=True)
            loss = tf.reduce_sum(per_example) / global_batch
            if nan_step >= 0:  # fault injection for tests of the NaN guard
                loss = loss * tf.where(step_now + 1 == nan_step, float("nan"), 1.0)
            total = loss + l2() if l2 is not None else loss
            scaled = optimizer.scale_loss(total) if float16 else total
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
        if backbone_factor is not None:  # a lower rate (or none) for the pretrained backbone
            factor = backbone_factor(step)
            grads = [g * factor if b else g for g, b in zip(grads, in_backbone)]
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
