"""TF Serving's REST JSON for predict: a request body's "instances" (rows)
or "inputs" (columns) as numpy arrays of the signature's inputs, checked
(nesting depth, a regular shape, the dtype, b64 strings, no lone
surrogates), and output arrays as the answer's "predictions" or
"outputs". Every refusal is INVALID_ARGUMENT with one sentence.
"""

import base64
import binascii
import json

import grpc
import numpy as np

from dplg_tf.errors import shorten
from dplg_tf.serving.requests import ServingError

REQUEST_KEYS = {"signature_name", "instances", "inputs"}
MAX_DIMS = 32   # numpy's arrays have at most 64


def invalid(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ------------------------------------------------------------ JSON -> arrays

def is_utf8(text):
    """False for a str holding a lone surrogate (JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_b64(value):
    return isinstance(value, dict) and set(value) == {"b64"}


def _leaf(value, kind, where):
    """One JSON scalar as a value of `kind` (numpy dtype, or bytes for strings)."""
    if kind is bytes:
        if _is_b64(value):
            if not isinstance(value["b64"], str):
                raise invalid(f"{where}: a b64 value must be a string.")
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise invalid(f"{where}: the b64 value is not valid base64.") from None
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:   # JSON's "\ud800": a lone surrogate
                raise invalid(f"{where}: a string holds a lone surrogate (not "
                              "UTF-8).") from None
        raise invalid(f"{where}: expected a string or {{\"b64\": ...}}, got "
                      f"{type(value).__name__}.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{where}: expected a number, got {shorten(json.dumps(value), 40)}.")
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        if not float(value).is_integer() or not info.min <= value <= info.max:
            raise invalid(f"{where}: {shorten(value, 40)} is not a {np.dtype(kind).name}.")
    return value


def _shape(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _walk(v, depth, shape, kind, where, flat):
    """The leaves of `v` onto `flat`, checking that it has `shape`."""
    if depth == len(shape):
        if isinstance(v, list):
            raise invalid(f"{where}: the lists are nested unevenly (ragged).")
        flat.append(_leaf(v, kind, where))
        return
    if not isinstance(v, list) or len(v) != shape[depth]:
        raise invalid(f"{where}: the lists are not all of the same length (ragged); "
                      f"expected shape {shape}.")
    for item in v:
        _walk(item, depth + 1, shape, kind, where, flat)


def to_array(value, kind, where):
    """A JSON value (nested lists of scalars) as a numpy array of `kind`;
    ragged lists are refused."""
    shape = _shape(value)
    if len(shape) > MAX_DIMS:
        raise invalid(f"{where}: the value has {len(shape)} dimensions; at most "
                      f"{MAX_DIMS} are taken.")
    flat = []
    try:
        _walk(value, 0, shape, kind, where, flat)
    except RecursionError:
        raise invalid(f"{where}: the value is nested too deeply.") from None
    if kind is bytes:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.asarray(flat, dtype=kind).reshape(shape)


def _kind(info):
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(info.dtype)
    return bytes if dtype == tf.string else dtype.as_numpy_dtype


def arrays_from_json(doc, infos):
    """({input: array}, format "row" or "columnar") of a predict body."""
    if "instances" in doc:
        rows = doc["instances"]
        if not isinstance(rows, list):
            raise invalid("'instances' must be a list (one entry per row).")
        names = sorted(infos)
        columns = {n: [] for n in names}
        for i, row in enumerate(rows):
            named = isinstance(row, dict) and not _is_b64(row)
            if not named:
                if len(names) != 1:
                    raise invalid(f"Instance {i} must be an object with the inputs "
                                  f"{names}; the signature has several.")
                row = {names[0]: row}
            if set(row) != set(names):
                raise invalid(f"Instance {i} has inputs {sorted(map(str, row))}; the "
                              f"signature takes {names}.")
            for n in names:
                columns[n].append(row[n])
        arrays = {n: to_array(columns[n], _kind(infos[n]), f"input {n!r}") for n in names}
        return arrays, "row"
    inputs = doc["inputs"]
    if not (isinstance(inputs, dict) and not _is_b64(inputs)):
        if len(infos) != 1:
            raise invalid(f"'inputs' must be an object with the inputs {sorted(infos)}.")
        inputs = {next(iter(infos)): inputs}
    unknown = sorted(set(map(str, inputs)) - set(infos))
    missing = sorted(set(infos) - set(inputs))
    if unknown or missing:
        raise invalid(f"The signature takes inputs {sorted(infos)}; missing {missing}, "
                      f"unexpected {shorten(unknown)}.")
    return {n: to_array(v, _kind(infos[n]), f"input {n!r}") for n, v in inputs.items()}, \
        "columnar"


# ------------------------------------------------------------ arrays -> JSON

def _json_value(array, name):
    if array.dtype == object or array.dtype.kind == "S":
        def leaf(b):
            b = bytes(b)
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(b).decode("ascii")}
            return b.decode("utf-8", errors="replace")
        return np.vectorize(leaf, otypes=[object])(array).tolist() if array.size else \
            array.tolist()
    return array.tolist()


def outputs_to_json(outputs, form):
    """The JSON answer of {output: array} in the request's format."""
    names = sorted(outputs)
    if form == "columnar":
        if len(names) == 1:
            return {"outputs": _json_value(outputs[names[0]], names[0])}
        return {"outputs": {n: _json_value(outputs[n], n) for n in names}}
    sizes = {n: (outputs[n].shape[0] if outputs[n].ndim else None) for n in names}
    first = sizes[names[0]]
    if first is None or any(s != first for s in sizes.values()):
        raise invalid(f"The outputs {sizes} (first dimensions) do not share a batch size, "
                      "so they cannot be answered as rows; send 'inputs' (columnar) "
                      "instead of 'instances'.")
    if len(names) == 1:
        return {"predictions": _json_value(outputs[names[0]], names[0])}
    columns = {n: _json_value(outputs[n], n) for n in names}
    return {"predictions": [{n: columns[n][i] for n in names} for i in range(first)]}
