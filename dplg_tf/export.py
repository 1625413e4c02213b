"""dplg-export: the descriptor model as a SavedModel for TensorFlow Serving.

    dplg-export --workdir=runs/demo --export_dir=models/dplg         # trained
    dplg-export --model=model.keras --export_dir=models/dplg
    dplg-export --config=configs/demo_cpu.py --allow_random_init --export_dir=...

writes BASE/<version>/ (the next integer unless --version), first under a
hidden temporary name and then renamed, so a server polling BASE never sees
half a model. Signatures (DESIGN.md):

- serving_default: image_bytes string [N] (JPEG, PNG, GIF, BMP) ->
  global_descriptor float32 [N, D], each image described at the paper's scales;
- multiscale: image uint8 [H, W, 3], scales float32 [S] -> global_descriptor
  [D], scale_descriptors [S, D], attention [H4, W4] at the scale nearest 1.

Preprocessing is in the graph: an image is first limited to a longest side of
`max_image_side` (1024), each scaled copy is at least `min_scaled_side` px a
side (the model's minimum), per-scale descriptors are L2-normalised,
averaged and L2-normalised again. The model's weights are written into the
graph as constants (`--freeze`, the default), which lets TensorFlow's graph
optimiser fold each BatchNorm's scale into its convolution's filter; with
serving_default's fixed scales laid out in the graph rather than in a loop,
extraction takes 1/1.2 of the time with variables on a 2-core CPU
(benchmarks/RESULTS.md). Bad input fails with InvalidArgument and
a message (TF Serving answers INVALID_ARGUMENT): undecodable bytes, formats
other than JPEG/PNG/GIF/BMP, and anything over the limits of
dplg_tf.images.Limits, checked before the work it bounds: images per
request, scales per request and their range, pixels of the decoded frames
(read from the headers, every frame of a GIF), the minimum side. Grayscale
and 16-bit images are converted, alpha is dropped, animated GIFs give their
first frame.
"""

import os
import shutil
import sys

from absl import flags

from dplg_tf import cli

from dplg_tf import images
from dplg_tf.images import DEFAULT_LIMITS

# the limits the signatures check themselves (TF Serving runs them as they are)
GRAPH_LIMITS = ("max_images_per_request", "max_scales", "max_scale", "max_pixels",
                "min_image_side")


# -------------------------------------------------------- graph functions

def frozen(model):
    """`model` as a function of images [1, H, W, 3] -> {descriptor, attention}, with
    its weights as graph constants (inference only)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    def forward(images):
        out = model(images, training=False)
        return out["descriptor"], out["attention"]

    spec = tf.TensorSpec([1, None, None, 3], tf.float32)
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
                 limits=DEFAULT_LIMITS, freeze=False):
        self.model = frozen(model) if freeze else model
        self.limits = limits
        self.scales = limits.check_scales(scales)
        self.max_image_side = float(max_image_side)
        self.min_scaled_side = int(min_scaled_side)
        self.dim = int(model.output["descriptor"].shape[-1])

    def multiscale(self, image, scales):
        """uint8 [H, W, 3], float32 [S] -> dict of descriptor, per-scale, attention."""
        import tensorflow as tf

        image = tf.convert_to_tensor(image)
        n = tf.size(scales)
        lim = self.limits
        valid = tf.debugging.Assert(tf.logical_and(tf.logical_and(
            n > 0, n <= lim.max_scales), tf.reduce_all(tf.logical_and(
                scales > 0.0, scales <= lim.max_scale))), [
            f"scales must be 1 to {lim.max_scales} values in (0, {lim.max_scale:g}]; got",
            scales])
        shape = tf.shape(image, out_type=tf.int64)
        large = tf.debugging.Assert(shape[0] * shape[1] <= lim.max_pixels, [
            "The image has", shape[0] * shape[1], "pixels; the limit is", lim.max_pixels])
        with tf.control_dependencies([valid, large]):
            base = self._base(image)
        nearest = tf.argmin(tf.abs(scales - 1.0), output_type=tf.int32)

        def body(i, descriptors, attention):
            d, a = self._describe_scaled(base, scales[i])
            attention = tf.cond(i == nearest, lambda: a, lambda: attention)
            return i + 1, descriptors.write(i, d), attention

        _, descriptors, attention = tf.while_loop(
            lambda i, *_: i < n, body,
            (tf.constant(0), tf.TensorArray(tf.float32, size=n, element_shape=[self.dim]),
             tf.zeros([0, 0], tf.float32)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape(None),
                              tf.TensorShape([None, None])))
        per_scale = descriptors.stack()
        fused = tf.math.l2_normalize(tf.reduce_mean(per_scale, axis=0))
        return {"global_descriptor": fused, "scale_descriptors": per_scale,
                "attention": attention}

    def _base(self, image):
        """The image as float32, limited to max_image_side; too small ones fail."""
        import tensorflow as tf

        from dplg_tf.graph_decode import limit_side

        shape = tf.shape(image)
        small = tf.debugging.Assert(tf.reduce_min(shape[:2]) >= self.limits.min_side, [
            "The image is", shape[0], "x", shape[1], "pixels; the shorter side must be "
            "at least", self.limits.min_side])
        with tf.control_dependencies([small]):
            return limit_side(image, self.max_image_side)

    def _describe_scaled(self, base, scale):
        """(L2-normalised descriptor [D], attention [H4, W4]) of `base` resized by `scale`."""
        import tensorflow as tf

        size = tf.cast(tf.shape(base)[:2], tf.float32)
        new = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), self.min_scaled_side)
        scaled = tf.image.resize(base, new, antialias=True)
        out = self.model(scaled[None], training=False)
        return (tf.math.l2_normalize(tf.cast(out["descriptor"][0], tf.float32)),
                tf.cast(out["attention"][0], tf.float32))

    def describe_image(self, image):
        """uint8 [H, W, 3] -> descriptor [D] at the configured scales, laid out
        one after another in the graph (no loop); equal to multiscale()."""
        import tensorflow as tf

        base = self._base(image)
        per_scale = [self._describe_scaled(base, scale)[0] for scale in self.scales]
        return tf.math.l2_normalize(tf.reduce_mean(tf.stack(per_scale), axis=0))

    def describe_bytes(self, image_bytes):
        """string [N] -> {"global_descriptor": float32 [N, D]} at the configured scales."""
        import tensorflow as tf

        from dplg_tf.graph_decode import decode

        lim = self.limits
        count = tf.debugging.Assert(tf.size(image_bytes) <= lim.max_images, [
            "A request may hold at most", lim.max_images, "images; it holds",
            tf.size(image_bytes)])

        def one(data):
            return self.describe_image(decode(data, lim.max_pixels, lim.min_side))

        with tf.control_dependencies([count]):
            image_bytes = tf.identity(image_bytes)
        # two images at a time at most: each decoded frame may be max_pixels large
        descriptors = tf.map_fn(one, image_bytes, parallel_iterations=2,
                                fn_output_signature=tf.TensorSpec([self.dim], tf.float32))
        return {"global_descriptor": tf.reshape(descriptors, [-1, self.dim])}


# ------------------------------------------------------------------ export

def saved_model_versions(base):
    """The complete versions (folders with saved_model.pb) under BASE, oldest first."""
    if not os.path.isdir(base):
        return []
    return sorted(int(d) for d in os.listdir(base)
                  if d.isdigit() and os.path.isfile(os.path.join(base, d, "saved_model.pb")))


def resolve_saved_model(path):
    """A SavedModel folder from a version folder or a base path (its newest version)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        versions = saved_model_versions(path)
        if not versions:
            raise FileNotFoundError(f"{path} holds no SavedModel version; run dplg-export.")
        path = os.path.join(path, str(versions[-1]))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"{path} is not a SavedModel folder.")
    return os.path.abspath(path)


def next_version(base):
    versions = [int(d) for d in os.listdir(base) if d.isdigit()] if os.path.isdir(base) else []
    return max(versions, default=0) + 1


def export(model, export_dir, version=None, scales=None, max_image_side=1024,
           min_scaled_side=64, limits=DEFAULT_LIMITS, freeze=True):
    """Write `model` as BASE/<version>/ with both signatures; returns the path.

    With `freeze`, the weights are graph constants (faster; no variables in
    the SavedModel); without it they are variables, as Keras exports them."""
    import tensorflow as tf

    from dplg_tf.config import PAPER_SCALES

    os.makedirs(export_dir, exist_ok=True)
    version = version or next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists; choose another --version or leave it out "
                              "to take the next one.")
    extractor = DescriptorExtractor(model, scales or PAPER_SCALES, max_image_side,
                                    min_scaled_side, limits, freeze=freeze)
    module = tf.Module()
    if not freeze:
        module.model = model  # its variables go into the SavedModel
    module.serving_default = tf.function(
        extractor.describe_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    module.multiscale = tf.function(
        extractor.multiscale,
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
                         tf.TensorSpec([None], tf.float32, name="scales")])
    tmp = os.path.join(export_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tf.saved_model.save(module, tmp, signatures={
            "serving_default": module.serving_default, "multiscale": module.multiscale})
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_for_export(workdir=None, model_path=None, config=None, allow_random_init=False):
    """The Keras descriptor model from a work dir, a .keras file or a config."""
    from dplg_tf.model import build_dplg, load_model

    if model_path:
        return load_model(model_path)
    if workdir:
        path = os.path.join(workdir, "model.keras")
        if os.path.isfile(path):
            return load_model(path)
        return _from_checkpoint(workdir, config)
    if config is not None:
        if not allow_random_init:
            raise ValueError("Exporting from a config alone gives random weights; pass "
                             "--allow_random_init if that is what you want (tests, demos).")
        return build_dplg(config)
    raise ValueError("Give --workdir, --model or --config (with --allow_random_init).")


def _from_checkpoint(workdir, config):
    """The descriptor model of the latest checkpoint of an unfinished run."""
    import json

    import ml_collections
    import tensorflow as tf

    from dplg_tf.model import build_training_model

    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if not latest:
        raise FileNotFoundError(f"{workdir} has neither model.keras nor a checkpoint; "
                                "is it a dplg-train work dir?")
    if config is None:
        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
    if not config.loss.num_classes:
        raise ValueError(f"{workdir}/config.json does not say how many classes the run "
                         "had; export from its model.keras instead.")
    model = build_training_model(config)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model.get_layer("dplg")


def _define_flags():
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "A dplg-train work dir (model.keras or checkpoints).")
    flags.DEFINE_string("model", None, "A .keras descriptor model.")
    config_flags.DEFINE_config_file("config", None, "Config file, with --allow_random_init.")
    flags.DEFINE_bool("allow_random_init", False, "Export an untrained model (tests, demos).")
    flags.DEFINE_string("export_dir", None, "Model base path: BASE/<version>/.", required=True)
    flags.DEFINE_integer("version", None, "Version number (default: the next one).")
    flags.DEFINE_list("scales", None, "Scales of serving_default (default: the paper's 5).")
    flags.DEFINE_integer("max_image_side", 1024, "Longest side before the scales.")
    images.define_limit_flags(GRAPH_LIMITS)
    flags.DEFINE_bool("freeze", True, "Write the weights into the graph as constants "
                      "(faster on CPU); --nofreeze keeps them as variables.")


def main(argv):
    del argv
    f = flags.FLAGS
    model = load_for_export(f.workdir, f.model, f.config, f.allow_random_init)
    scales = [float(s) for s in f.scales] if f.scales else None
    min_side = f.config.model.min_image_size if f.config is not None else 64
    path = export(model, f.export_dir, f.version, scales, f.max_image_side, min_side,
                  images.limits_from_flags(GRAPH_LIMITS), f.freeze)
    print(path)


def run():
    _define_flags()
    cli.run(main, "dplg-export")


if __name__ == "__main__":
    sys.exit(run())
