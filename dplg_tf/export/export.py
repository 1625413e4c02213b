"""dplg-export: the descriptor model as a SavedModel for TensorFlow Serving.

    dplg-export --workdir=runs/demo --output_dir=models/dplg         # trained
    dplg-export --keras_model=model.keras --output_dir=models/dplg
    dplg-export --config=configs/demo_cpu.py --allow_random_init --output_dir=...

writes BASE/<version>/ (the next integer unless --version), first under a
hidden temporary name and then renamed, so a server polling BASE never sees
half a model. Signatures (DESIGN.md):

- serving_default: image_bytes string [N] (JPEG, PNG, GIF, BMP) ->
  global_descriptor float32 [N, D], each image described at the paper's scales;
- multiscale: image uint8 [H, W, 3], scales float32 [S] -> global_descriptor
  [D], scale_descriptors [S, D], attention [H4, W4] at the scale nearest 1.

Not signatures (TF Serving does not see them), for dplg-extract in-process:
`decode_limited` (one image's bytes -> float32 [h, w, 3], limited),
`describe_batch` (same-size images [N, h, w, 3], scales [S] -> [N, D]) and
the variable `scales` (serving_default's scales).

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


from dplg_tf.errors import OutputExists
from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.export.signatures import DescriptorExtractor
from dplg_tf.images import DEFAULT_LIMITS
from dplg_tf.export import warmup
from dplg_tf.export.saved_models import next_version
from dplg_tf.storage.atomic import atomic_path

# the limits the signatures check themselves (TF Serving runs them as they are)


def export(model, export_dir, version=None, scales=None, max_image_side=1024,
           min_scaled_side=64, limits=DEFAULT_LIMITS, freeze=True, whitening=None,
           refinements=None, precision="float32"):
    """Write `model` as BASE/<version>/ with both signatures; returns the path.

    With `freeze`, the weights are graph constants (faster; no variables in
    the SavedModel); without it they are variables, as Keras exports them.
    `whitening`, a dplg-whiten file, ends both signatures with its
    layers.Whitening (the descriptor may then be shorter). TF Serving's warm-up
    file goes into assets.extra/ (export.warmup). `refinements`
    (export.refinements.Refinements) change the pooling; they are recorded as
    the SavedModel's `refinements` (JSON). `precision` (export.precision:
    float32, bfloat16, float16) is what the layers compute in; the
    descriptors are float32 whatever it is; recorded as `precision`."""
    import tensorflow as tf

    from dplg_tf.config import PAPER_SCALES
    from dplg_tf.export.precision import in_precision
    from dplg_tf.export.refinements import NONE, refined

    refinements = refinements or NONE
    model = refined(model, refinements)
    plain = model
    model = in_precision(model, precision)

    os.makedirs(export_dir, exist_ok=True)
    version = version or next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise OutputExists(f"{final} exists; choose another --version or leave it out "
                              "to take the next one.")
    scales = scales or PAPER_SCALES
    layer = None
    if whitening:
        layer = whitening_layer(whitening, plain, scales, max_image_side, min_scaled_side,
                                refinements.scale_aggregation)
    extractor = DescriptorExtractor(model, scales, max_image_side, min_scaled_side, limits,
                                    freeze=freeze, whitening=layer,
                                    aggregation=refinements.scale_aggregation)
    module = tf.Module()
    if not freeze:
        module.model = model  # its variables go into the SavedModel
    if layer is not None:
        module.whitening = layer
    module.serving_default = tf.function(
        extractor.describe_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    module.multiscale = tf.function(
        extractor.multiscale,
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
                         tf.TensorSpec([None], tf.float32, name="scales")])
    module.decode_limited = tf.function(
        extractor.decode_limited,
        input_signature=[tf.TensorSpec([], tf.string, name="image_bytes")])
    module.describe_batch = tf.function(
        extractor.describe_batch,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),
                         tf.TensorSpec([None], tf.float32, name="scales")])
    module.scales = tf.Variable(extractor.scales, trainable=False, dtype=tf.float32)
    module.refinements = tf.Variable(refinements.to_json(), trainable=False, dtype=tf.string)
    module.preprocessing = tf.Variable(preprocessing_of(model), trainable=False,
                                       dtype=tf.string)
    module.precision = tf.Variable(precision, trainable=False, dtype=tf.string)
    # a hidden folder renamed into place: a server polling BASE never sees half a
    # model, and a version made meanwhile by another export is not replaced
    with atomic_path(final) as tmp:
        tf.saved_model.save(module, tmp, signatures={
            "serving_default": module.serving_default, "multiscale": module.multiscale})
        warmup.write(tmp, os.path.basename(os.path.normpath(export_dir)))
    return final


def preprocessing_of(model):
    """The ImagePreprocessing mode inside `model` (recorded in the SavedModel)."""
    try:
        return model.get_layer("preprocessing").mode
    except ValueError:
        return ""


def whitening_layer(path, model, scales, max_image_side, min_scaled_side, aggregation="mean"):
    """The layers.Whitening of a dplg-whiten file, refused when the file was
    learned on another model (its probe descriptor differs from this one's)."""
    from dplg_tf.storage import whitening as whitening_file
    from dplg_tf.storage.descriptors import same_probe
    from dplg_tf.images import probe_image
    from dplg_tf.nn.layers import Whitening

    mean, projection, metadata = whitening_file.load(path)
    plain = DescriptorExtractor(model, scales, max_image_side, min_scaled_side,
                                aggregation=aggregation)
    if mean.shape[0] != plain.dim:
        raise UserError(f"{path} whitens {mean.shape[0]}-d descriptors but the model "
                        f"gives {plain.dim}-d ones; learn it on this model.")
    probe = metadata.get("probe")
    if probe is not None and not same_probe(plain.describe_image(probe_image()).numpy(),
                                            probe):
        raise UserError(f"{path} was learned on another model (or other scales) than the "
                        "one exported: its probe descriptor differs; run dplg-whiten on a "
                        "SavedModel of this model.")
    return Whitening.from_arrays(mean, projection, name="whitening")


def load_for_export(workdir=None, model_path=None, config=None, allow_random_init=False):
    """The Keras descriptor model from a work dir, a .keras file or a config."""
    from dplg_tf.nn.model import build_dplg, is_off_the_shelf, load_model

    if model_path:
        return load_model(model_path)
    if workdir:
        path = os.path.join(workdir, "model.keras")
        if os.path.isfile(path):
            return load_model(path)
        return _from_checkpoint(workdir, config)
    if config is not None:
        if not allow_random_init and not is_off_the_shelf(config):
            raise UserError("Exporting from a config alone gives random weights (only a "
                            "pretrained backbone with head 'gem' and descriptor_dim 0 has "
                            "none); pass --allow_random_init if that is what you want.")
        return build_dplg(config)
    raise UserError("Give --workdir, --keras_model or --config (with --allow_random_init).")


def _from_checkpoint(workdir, config):
    """The descriptor model of the latest checkpoint of an unfinished run."""
    import tensorflow as tf

    from dplg_tf.nn.model import build_training_model

    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    config = config if config is not None else run_config(workdir)
    if not latest or config is None:
        raise InputNotFound(f"{workdir} has neither model.keras nor a checkpoint with its "
                            "config.json; is it a dplg-train work dir?")
    if not config.loss.num_classes:
        raise UserError(f"{workdir}/config.json does not say how many classes the run "
                        "had; export from its model.keras instead.")
    model = build_training_model(config)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model.get_layer("dplg")


def run_config(workdir):
    """The config a dplg-train run recorded (workdir/config.json), or None."""
    import json

    import ml_collections

    path = os.path.join(workdir or "", "config.json")
    if not workdir or not os.path.isfile(path):
        return None
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
