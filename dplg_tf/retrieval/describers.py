"""The one source of descriptors: an exported SavedModel on disk or a server.

    describer = Describer(model="models/dplg")          # base path or version folder
    describer = Describer(server="127.0.0.1:8500")      # dplg-serve or TF Serving

Both give the same numbers through the same two signatures (DESIGN.md):
`describe_bytes` (serving_default: encoded images -> [N, D]) and
`multiscale` (one decoded image at the given scales). `describe_files`
reads, checks and describes image files in batches and reports the bad
ones; `probe()` is the model's descriptor of the fixed probe image, which
every descriptor file carries; `identity` names the model (the SavedModel
folder, or grpc://server/name/version).
"""

import numpy as np

from dplg_tf import images
from dplg_tf.errors import UserError


class Describer:
    def __init__(self, model=None, server=None, model_name="dplg", model_version=None,
                 timeout=600.0, retries=4, limits=None):
        if bool(server) == bool(model):
            raise UserError("Give exactly one of --model (a SavedModel) or --server "
                             "(host:port).")
        self.limits = limits or images.DEFAULT_LIMITS
        self._probe = None
        if server:
            from dplg_tf.serving.client import Client, refusal

            self.client = Client(server, model_name, timeout, retries, version=model_version,
                                 max_message_mb=self.limits.max_request_mb)
            version = model_version or self.client.status()[0][0]
            self.identity = f"grpc://{server}/{model_name}/{version}"
            self._refusal, self.concurrency = refusal, 4
        else:
            import tensorflow as tf

            from dplg_tf.export.saved_models import resolve_saved_model

            self.client = None
            self.identity = resolve_saved_model(model)
            loaded = tf.saved_model.load(self.identity)
            self._loaded = loaded  # keeps the signatures' variables alive
            self._default = loaded.signatures["serving_default"]
            self._multiscale = loaded.signatures["multiscale"]
            self._refusal, self.concurrency = images.tf_refusal, 1

    def describe_bytes(self, blobs):
        """Encoded images (list of bytes) -> descriptors [N, D]."""
        if self.client is not None:
            return self.client.describe_bytes(blobs)
        import tensorflow as tf

        return self._default(image_bytes=tf.constant(list(blobs), tf.string))[
            "global_descriptor"].numpy()

    def multiscale(self, image, scales):
        """uint8 image [H, W, 3] -> {global_descriptor, scale_descriptors, attention}."""
        if self.client is not None:
            return self.client.multiscale(image, scales)
        import tensorflow as tf

        out = self._multiscale(image=tf.constant(np.asarray(image, np.uint8)),
                               scales=tf.constant(list(scales), tf.float32))
        return {k: v.numpy() for k, v in out.items()}

    def describe_files(self, paths, batch_size=8, progress=None, concurrency=None):
        """(names, descriptors [n, D], [(name, reason)]): bad images are reported."""
        return images.describe_files(self.describe_bytes, paths, batch_size,
                                     concurrency or self.concurrency, self.limits, progress,
                                     self._refusal)

    def probe(self):
        """The model's descriptor of images.probe_image() (computed once)."""
        if self._probe is None:
            self._probe = np.asarray(self.describe_bytes([images.probe_bytes()])[0], np.float32)
        return self._probe

    def close(self):
        if self.client is not None:
            self.client.close()
