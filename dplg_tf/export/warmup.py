"""TF Serving's warm-up file: `assets.extra/tf_serving_warmup_requests` of an export.

A TFRecord file of PredictionLog protos (tensorflow_serving.apis), each one
PredictRequest that TF Serving (`--enable_model_warmup`, its default) and
dplg-serve replay once when they load the version, so the first clients do
not pay for building the graph's kernels. `write` puts a few requests for
each signature into a version folder (well under TF Serving's limit of 1000
records): serving_default with 1 and with 4 images (the probe facade as
JPEG, at two sizes), multiscale with one image at the scales 1 and 1/sqrt 2.
`read` gives the (signature, inputs) pairs back, checked, or raises
WarmupError naming the record.
"""

import io
import os

import numpy as np

from dplg_tf.errors import UserError

FOLDER = "assets.extra"
FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving refuses a warm-up file with more


class WarmupError(UserError):
    """A warm-up file that cannot be replayed."""


def path_in(version_dir):
    return os.path.join(version_dir, FOLDER, FILE)


def _jpeg(side):
    from PIL import Image

    from dplg_tf.images import facade_image

    buf = io.BytesIO()
    Image.fromarray(facade_image(side, side * 4 // 3, seed=1)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def requests():
    """[(signature, {input: array})] that the warm-up file holds."""
    from dplg_tf.images import facade_image

    small, large = _jpeg(96), _jpeg(240)
    image = facade_image(160, 200, seed=2)
    return [("serving_default", {"image_bytes": np.array([large], object)}),
            ("serving_default", {"image_bytes": np.array([small, large, small, large],
                                                         object)}),
            ("multiscale", {"image": image.astype(np.uint8),
                            "scales": np.array([1.0, 0.70710678], np.float32)})]


def write(version_dir, model_name="dplg"):
    """Write the warm-up file into `version_dir` (before it is renamed into place)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    os.makedirs(os.path.join(version_dir, FOLDER), exist_ok=True)
    with tf.io.TFRecordWriter(path_in(version_dir)) as writer:
        for signature, inputs in requests():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def read(version_dir, signatures):
    """[(signature, {input: array})] of the version's warm-up file ([] when it has none);
    WarmupError for a file that is not TFRecords of PredictionLog, holds more
    than MAX_RECORDS, or asks for a signature or input the model does not have."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = path_in(version_dir)
    if not os.path.isfile(path):
        return []
    out = []
    try:
        for i, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            if i >= MAX_RECORDS:
                raise WarmupError(f"{path} holds more than {MAX_RECORDS} records.")
            log = prediction_log_pb2.PredictionLog()
            log.ParseFromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                raise WarmupError(f"{path}: record {i} is not a predict request; only "
                                  "Predict is served.")
            request = log.predict_log.request
            name = request.model_spec.signature_name or "serving_default"
            if name not in signatures:
                raise WarmupError(f"{path}: record {i} asks for signature {name!r}, which "
                                  "the model does not have.")
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            if set(inputs) != set(signatures[name]):
                raise WarmupError(f"{path}: record {i} gives inputs {sorted(inputs)} to "
                                  f"{name!r}, which takes {sorted(signatures[name])}.")
            out.append((name, inputs))
    except WarmupError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file, whatever broke in it
        raise WarmupError(f"{path} is not a file of TFRecords of PredictionLog "
                          f"({type(e).__name__}: {str(e)[:160]}).") from None
    return out
