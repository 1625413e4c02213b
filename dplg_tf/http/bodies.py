"""JSON bodies parsed within bounds: the nesting depth and the numbers of
values and objects are read from the bytes (a few passes at C speed) before
the body is parsed, so a body that would be refused after parsing costs no
parsed document."""

import json
import re

from dplg_tf.http.server import DEFAULT_HTTP_LIMITS, HttpError

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_PAIR = re.compile(rb"\[\]|\{\}")


def _outside_strings(body):
    """`body` without the contents of its JSON strings (quotes kept)."""
    if b'"' not in body:
        return body
    if b"\\" in body:   # in a string a backslash starts a two-byte escape
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b'""'.join(body.split(b'"')[0::2])


def parse_json(body, limits=DEFAULT_HTTP_LIMITS, what="The request body"):
    """The JSON value of `body` (bytes), or HttpError 400 with the reason: not
    JSON, or past `limits` (HttpLimits) in depth, values or objects."""
    bare = _outside_strings(body)
    objects = bare.count(b"{")
    values = bare.count(b",") + bare.count(b"[") + objects
    if values > limits.json_max_items:
        raise HttpError(400, f"{what} holds about {values} JSON values; the limit is "
                        f"{limits.json_max_items}.")
    if objects > limits.json_max_objects:
        raise HttpError(400, f"{what} holds {objects} JSON objects; the limit is "
                        f"{limits.json_max_objects}.")
    brackets, depth = bare.translate(None, _NOT_BRACKETS), 0
    del bare
    while brackets:   # each pass removes the innermost pairs: one level
        inner = _PAIR.sub(b"", brackets)
        if len(inner) == len(brackets):
            raise HttpError(400, f"{what} is not valid JSON (its brackets do not pair).")
        brackets, depth = inner, depth + 1
        if depth > limits.json_max_depth:
            raise HttpError(400, f"{what} nests JSON arrays and objects more than "
                            f"{limits.json_max_depth} deep.")
    del brackets
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        message = str(e)[:120]
    raise HttpError(400, f"{what} is not valid JSON ({message}).")
