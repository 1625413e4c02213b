"""TensorBoard output of dplg-train: one writer per folder, no-op off the chief."""

import os


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


class MetricWriter:
    """Scalars and images into `workdir/name`; does nothing when not `enabled`."""

    def __init__(self, workdir, name, enabled=True):
        import tensorflow as tf

        self.folder = os.path.join(workdir, name)
        self._writer = tf.summary.create_file_writer(self.folder) if enabled else None

    @property
    def enabled(self):
        return self._writer is not None

    def scalars(self, step, values):
        import tensorflow as tf

        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def attention(self, step, images, attention, max_outputs):
        import tensorflow as tf

        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            tf.summary.image("attention", attention_images(images, attention),
                             max_outputs=max_outputs)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()
