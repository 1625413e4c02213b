"""TensorBoard output of dplg-train: one writer per folder, no-op off the chief."""

import os

from dplg_tf.images.attention import side_by_side


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
            tf.summary.image("attention", side_by_side(images, attention).astype("float32"),
                             max_outputs=max_outputs)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()
