"""Training: the tf.distribute trainer, the optimiser and step, summaries,
fusion diagnostics, malloc tuning and the JAX step.

Imports: errors, config, console, storage, images, nn, data.
"""
