"""The traced functions of the exported signatures (graph side).

`DescriptorExtractor` wraps a Keras descriptor model: `describe_bytes` is
serving_default (encoded images -> descriptors at fixed scales) and
`multiscale` the signature of the same name; `decode_limited` and
`describe_batch` are the bulk path (dplg-extract: decode, then same-size
images through the model together). `frozen(model)` gives the
model with its weights as graph constants. Everything is bounded by
dplg_tf.images.Limits and checked inside the graph, so TensorFlow Serving
enforces the same limits as dplg-serve.
"""

from dplg_tf.images import DEFAULT_LIMITS


def frozen(model):
    """`model` as a function of images [N, H, W, 3] -> {descriptor, attention}, with
    its weights as graph constants (inference only)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    def forward(images):
        out = model(images, training=False)
        return out["descriptor"], out["attention"]

    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    fn = convert_variables_to_constants_v2(tf.function(forward).get_concrete_function(spec))

    def call(images, training=False):
        del training
        descriptor, attention = fn(images)
        return {"descriptor": descriptor, "attention": attention}

    return call


class DescriptorExtractor:
    """The traced functions around a Keras descriptor model, bounded by `limits`
    (dplg_tf.images.Limits: images per request, scales, pixels, minimum side)."""

    def __init__(self, model, scales, max_image_side=1024, min_scaled_side=64,
                 limits=DEFAULT_LIMITS, freeze=False, whitening=None, aggregation="mean"):
        self.model = frozen(model) if freeze else model
        self.aggregation = aggregation   # of the scales: "mean" (the paper) or "max"
        self.limits = limits
        self.scales = limits.check_scales(scales)
        self.max_image_side = float(max_image_side)
        self.min_scaled_side = int(min_scaled_side)
        # an optional layers.Whitening at the end of both signatures
        self.whitening = whitening
        self.dim = int(whitening.output_dim if whitening is not None
                       else model.output["descriptor"].shape[-1])
        self.model_dim = int(model.output["descriptor"].shape[-1])

    def _whiten(self, descriptors):
        """[N, D] -> [N, dim]: the whitening layer, or nothing."""
        import tensorflow as tf

        if self.whitening is None:
            return descriptors
        return tf.cast(self.whitening(descriptors), tf.float32)

    def _check_scales(self, scales):
        """The scales, after the graph's check of their count and range."""
        import tensorflow as tf

        lim = self.limits
        scales = tf.convert_to_tensor(scales, tf.float32)
        n = tf.size(scales)
        valid = tf.debugging.Assert(tf.logical_and(tf.logical_and(
            n > 0, n <= lim.max_scales), tf.reduce_all(tf.logical_and(
                scales > 0.0, scales <= lim.max_scale))), [
            f"scales must be 1 to {lim.max_scales} values in (0, {lim.max_scale:g}]; got",
            scales])
        with tf.control_dependencies([valid]):
            return tf.identity(scales)

    def _at_scales(self, images, scales):
        """The multi-scale extraction, the one implementation behind every
        signature: images [N, h, w, 3] of one size (from _base) -> (per-scale
        L2-normalised descriptors [S, N, model_dim], the attention [N, H4, W4]
        at the scale nearest 1). Each scale resizes the images by `scale`, or by
        the larger factor that brings the shorter side to min_scaled_side (both
        sides alike: the aspect ratio is kept)."""
        import tensorflow as tf

        n = tf.size(scales)
        size = tf.cast(tf.shape(images)[1:3], tf.float32)
        nearest = tf.argmin(tf.abs(scales - 1.0), output_type=tf.int32)

        def body(i, descriptors, attention):
            factor = tf.maximum(scales[i], self.min_scaled_side / tf.reduce_min(size))
            new = tf.maximum(tf.cast(tf.round(size * factor), tf.int32), self.min_scaled_side)
            out = self.model(tf.image.resize(images, new, antialias=True), training=False)
            d = tf.math.l2_normalize(tf.cast(out["descriptor"], tf.float32), axis=-1)
            a = tf.cast(out["attention"], tf.float32)
            attention = tf.cond(i == nearest, lambda: a, lambda: attention)
            return i + 1, descriptors.write(i, d), attention

        _, descriptors, attention = tf.while_loop(
            lambda i, *_: i < n, body,
            (tf.constant(0), tf.TensorArray(tf.float32, size=n,
                                            element_shape=[None, self.model_dim]),
             tf.zeros([tf.shape(images)[0], 0, 0], tf.float32)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape(None),
                              tf.TensorShape([None, None, None])))
        return descriptors.stack(), attention

    def _fuse(self, per_scale):
        """[S, N, model_dim] -> [N, dim]: the mean of the scales (the paper's
        aggregation) or their element-wise maximum, normalised, then the
        optional whitening."""
        import tensorflow as tf

        pool = tf.reduce_max if self.aggregation == "max" else tf.reduce_mean
        return self._whiten(tf.math.l2_normalize(pool(per_scale, axis=0), axis=-1))

    def multiscale(self, image, scales):
        """uint8 [H, W, 3], float32 [S] -> dict of descriptor, per-scale, attention."""
        import tensorflow as tf

        image = tf.convert_to_tensor(image)
        scales = self._check_scales(scales)
        shape = tf.shape(image, out_type=tf.int64)
        large = tf.debugging.Assert(shape[0] * shape[1] <= self.limits.max_pixels, [
            "The image has", shape[0] * shape[1], "pixels; the limit is",
            self.limits.max_pixels])
        with tf.control_dependencies([large]):
            base = self._base(image)
        per_scale, attention = self._at_scales(base[None], scales)
        return {"global_descriptor": self._fuse(per_scale)[0],
                "scale_descriptors": self._whiten(per_scale[:, 0]),
                "attention": attention[0]}

    def _base(self, image):
        """The image as float32, limited to max_image_side; too small ones fail."""
        import tensorflow as tf

        from dplg_tf.export.graph_decode import limit_side

        shape = tf.shape(image)
        small = tf.debugging.Assert(tf.reduce_min(shape[:2]) >= self.limits.min_side, [
            "The image is", shape[0], "x", shape[1], "pixels; the shorter side must be "
            "at least", self.limits.min_side])
        with tf.control_dependencies([small]):
            return limit_side(image, self.max_image_side)

    def decode_limited(self, image_bytes):
        """string [] -> float32 [h, w, 3]: decoded, checked and limited to
        max_image_side, as serving_default does before its scales."""
        from dplg_tf.export.graph_decode import decode

        lim = self.limits
        return self._base(decode(image_bytes, lim.max_pixels, lim.min_side))

    def describe_batch(self, images, scales):
        """float32 [N, h, w, 3] images of one size, each from decode_limited, and
        scales [S] -> {"global_descriptor": [N, D]}: one model call per scale for
        the whole batch; equal to serving_default image by image."""
        import tensorflow as tf

        lim = self.limits
        shape = tf.shape(images)
        ok = tf.debugging.Assert(tf.logical_and(tf.logical_and(
            shape[0] <= lim.max_images, tf.reduce_max(shape[1:3]) <= int(self.max_image_side)),
            tf.reduce_min(shape[1:3]) >= 1), [
            "describe_batch takes at most", lim.max_images, "images from decode_limited, "
            "with sides up to", int(self.max_image_side), "; got shape", shape])
        with tf.control_dependencies([ok]):
            images = tf.identity(images)
        return {"global_descriptor": self._fuse(self._at_scales(
            images, self._check_scales(scales))[0])}

    def describe_image(self, image):
        """uint8 [H, W, 3] -> descriptor [dim] at the configured scales; equal to
        multiscale() at those scales."""
        import tensorflow as tf

        base = self._base(image)
        return self._fuse(self._at_scales(base[None], tf.constant(self.scales, tf.float32))[0])[0]

    def describe_bytes(self, image_bytes):
        """string [N] -> {"global_descriptor": float32 [N, D]} at the configured scales."""
        import tensorflow as tf

        from dplg_tf.export.graph_decode import decode

        from dplg_tf.export.graph_decode import header_size

        lim = self.limits
        count = tf.debugging.Assert(tf.size(image_bytes) <= lim.max_images, [
            "A request may hold at most", lim.max_images, "images; it holds",
            tf.size(image_bytes)])
        with tf.control_dependencies([count]):
            # every header is read before any image is decoded: the request's total
            total = tf.reduce_sum(tf.map_fn(lambda d: header_size(d)[2], image_bytes,
                                            fn_output_signature=tf.int64))
        budget = tf.debugging.Assert(total <= lim.max_request_pixels, [
            "The request's images hold", total, "pixels together; the limit is",
            lim.max_request_pixels, ": send fewer images per request"])

        def one(data):
            return self.describe_image(decode(data, lim.max_pixels, lim.min_side))

        with tf.control_dependencies([count, budget]):
            image_bytes = tf.identity(image_bytes)
        # two images at a time at most: each decoded frame may be max_pixels large
        descriptors = tf.map_fn(one, image_bytes, parallel_iterations=2,
                                fn_output_signature=tf.TensorSpec([self.dim], tf.float32))
        return {"global_descriptor": tf.reshape(descriptors, [-1, self.dim])}
