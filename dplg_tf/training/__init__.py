"""Training: the tf.distribute trainer (trainer), the optimiser and step
(optim), summaries, fusion diagnostics (diagnostics), malloc tuning (malloc)
and the JAX step (jax_step).

Imports: errors, config, console, storage, images, nn, data.
"""
