"""The training step on Keras' JAX backend (KERAS_BACKEND=jax).

dplg-train runs on TensorFlow (tf.distribute, tf.data); the model itself is
written with keras.ops only, so the same model trains under JAX. This is
the proof and the way to time it on a GPU without TensorFlow:
`build_jax_step` gives a jitted function (state, images, labels) ->
(loss, state) that runs the forward pass, the ArcFace loss (mean over the
batch), the backward pass and the optimiser's update (dplg_tf.training.optim's SGD
with momentum and weight decay), all stateless.
"""

import os


def check_backend():
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=jax "
                           "before Python starts.")


def build_jax_step(model, optimizer):
    """(step, state): `step(state, images, labels) -> (loss, state)`, jitted."""
    import jax
    import keras

    check_backend()

    def loss_fn(trainable, non_trainable, images, labels):
        out, non_trainable = model.stateless_call(trainable, non_trainable, [images, labels],
                                                  training=True)
        logits = keras.ops.cast(out["logits"], "float32")
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                   from_logits=True)
        return keras.ops.mean(per_example), non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def step(state, images, labels):
        trainable, non_trainable, optimizer_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, images, labels)
        trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return loss, (trainable, non_trainable, optimizer_vars)

    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    return step, state


def setup(config, num_classes, max_steps=1000):
    """The training model, its optimiser (built) and the jitted step."""
    check_backend()
    from dplg_tf.nn.model import build_training_model
    from dplg_tf.training.optim import make_optimizer

    model = build_training_model(config, num_classes)
    optimizer = make_optimizer(config, model, max_steps)
    optimizer.build(model.trainable_variables)
    step, state = build_jax_step(model, optimizer)
    return model, step, state


def backend_environment(env=None):
    """A copy of `env` (default os.environ) that starts Keras on JAX, on the CPU
    unless JAX_PLATFORMS says otherwise."""
    env = dict(os.environ if env is None else env)
    env["KERAS_BACKEND"] = "jax"
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env
