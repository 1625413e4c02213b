"""An extraction folder (dplg-extract's output) on disk, read and written
without Ray.

    OUT/manifest.json           the model (fingerprint, probe, dim), scales,
                                limits, shard size and the input listing's hash
    OUT/listing.txt             the sorted inputs, one per line
    OUT/shards/shard-00000.parquet   name, descriptor float32[D] (null when
                                refused), status ("ok" or the reason's class)
    OUT/errors/shard-00000.parquet   name, reason, for the refused images
    OUT/partial/shard-00000.parquet  the rows of an unfinished shard so far
                                (index, name, descriptor, status, reason),
                                rewritten every minute or so; a rerun keeps
                                them and describes only the rest
    OUT/progress.json           images/s, shards done, errors, ETA

Each Parquet file is written under a temporary name and renamed; a shard's
errors file is committed before the shard itself, so a shard file that
exists is complete (its partial file is then removed). Each shard and
partial file carries the model's fingerprint in its schema metadata.
"""

import hashlib
import json
import os

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage.descriptors import same_probe
from dplg_tf.storage.atomic import atomic_path, set_aside, write_atomic

# what must match for a rerun to resume into the same folder
KEYS = ("fingerprint", "requested_scales", "limits", "listing_sha256", "shard_size", "dim")


def shard_path(out, i, table="shards"):
    return os.path.join(out, table, f"shard-{i:05d}.parquet")


def listing_hash(names):
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


MAX_MANIFEST_BYTES = 1 << 24   # a manifest holds a probe and a few numbers


def read_manifest(out):
    """The folder's manifest.json, checked: an object with the fields a reader
    needs, numbers in range, one shard count that fits the images."""
    path = os.path.join(out, "manifest.json")
    if not os.path.isfile(path):
        raise InputNotFound(f"{out} is not a dplg-extract output folder (no manifest.json).")
    try:
        if os.path.getsize(path) > MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); delete {out} and extract again.") from None
    _check_manifest(out, manifest)
    return manifest


def _check_manifest(out, m):
    def bad(what):
        raise UserError(f"{out}/manifest.json is damaged ({what}); delete {out} and "
                        "extract again.")

    ints = {k: m.get(k) for k in ("images", "shard_size", "num_shards") if k in m}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints.values()):
        bad("a count that is not a whole number >= 0")
    if {"images", "shard_size", "num_shards"} <= set(m) and (
            m["shard_size"] < 1 or m["num_shards"] != -(-m["images"] // m["shard_size"])):
        bad("its shard count does not fit its images and shard size")
    if "dim" in m and (not isinstance(m["dim"], int) or not 1 <= m["dim"] <= 65536):
        bad("the descriptor size is out of range")
    probe = m.get("probe")
    if probe is not None and (not isinstance(probe, list) or len(probe) != m.get("dim")
                              or not all(isinstance(v, (int, float)) and np.isfinite(v)
                                         for v in probe)):
        bad("its probe descriptor is not dim finite numbers")


def check_folder(out, manifest):
    """UserError if `out` holds an extraction whose manifest differs from the
    given (possibly partial) one; True if it holds one, False if not."""
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        return False
    old = read_manifest(out)
    for key in KEYS:
        if key in manifest and old.get(key) != manifest[key]:
            raise UserError(f"{out} holds an extraction made with {_what(key)} "
                            f"({old.get(key)!r:.80} there, {manifest[key]!r:.80} now); "
                            "use another --output_dir or the same arguments.")
    if "probe" in manifest and not same_probe(old["probe"], manifest["probe"]):
        raise UserError(f"{out} was extracted by another model (its probe descriptor "
                        "differs); use another --output_dir.")
    return True


def open_folder(out, manifest, names):
    """Write the manifest and listing of a new folder, or check that an existing
    one was made by the same model, scales, limits and inputs."""
    path = os.path.join(out, "manifest.json")
    if check_folder(out, manifest):
        return
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    os.makedirs(os.path.join(out, "errors"), exist_ok=True)
    write_atomic(os.path.join(out, "listing.txt"), "".join(
        n + "\n" for n in names).encode("utf-8", "surrogateescape"))
    write_atomic(path, json.dumps(manifest, indent=1).encode())


def _what(key):
    return {"fingerprint": "another model", "requested_scales": "other scales",
            "limits": "other limits", "listing_sha256": "another input listing",
            "shard_size": "another --shard_size", "dim": "another descriptor size"}[key]


def done_shards(out, count, manifest=None, damaged=None):
    """The shards committed and whole: with `manifest`, each file is also
    checked (its Parquet footer, schema, model and row count, its errors
    file); a damaged one is set aside (renamed *.damaged, and listed in
    `damaged` as (path, reason)) so that a rerun describes it again."""
    done = set()
    for i in range(count):
        path = shard_path(out, i)
        if not os.path.isfile(path):
            continue
        problem = check_shard(path, manifest, i) if manifest else None
        if problem:
            set_aside(path)
            if damaged is not None:
                damaged.append((path, problem))
            continue
        done.add(i)
    return done


def check_shard(path, manifest, i):
    """Why shard file `path` (shard `i`) cannot be used with `manifest`, or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    dim = int(manifest["dim"])
    want = pa.schema([("name", pa.string()), ("descriptor", pa.list_(pa.float32(), dim)),
                      ("status", pa.string())])
    if not schema.remove_metadata().equals(want):
        return "another schema"
    info = schema.metadata or {}
    if info.get(b"dplg.fingerprint", b"").decode() != str(manifest.get("fingerprint")):
        return "written by another model"
    size = int(manifest["shard_size"])
    expected = min(size, int(manifest["images"]) - i * size)
    if meta.num_rows != expected:
        return f"{meta.num_rows} rows, not {expected}"
    errors = shard_path(os.path.dirname(os.path.dirname(path)), i, "errors")
    try:
        pq.ParquetFile(errors).metadata
    except (OSError, pa.ArrowException, ValueError):
        return "its errors file is missing or damaged"
    return None


def _write_parquet(path, table):
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_shard(out, i, names, descriptors, errors, manifest):
    """Commit shard `i`: `errors[j]` is None or (status, reason) for names[j]."""
    import pyarrow as pa

    dim = int(manifest["dim"])
    bad = [j for j, e in enumerate(errors) if e is not None]
    _write_parquet(shard_path(out, i, "errors"), pa.table({
        "name": pa.array([names[j] for j in bad], pa.string()),
        "reason": pa.array([errors[j][1] for j in bad], pa.string())}))
    flat = pa.array(np.asarray(descriptors, np.float32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(
        [e is not None for e in errors]))
    schema = pa.schema([("name", pa.string()), ("descriptor", pa.list_(pa.float32(), dim)),
                        ("status", pa.string())], metadata={
        "dplg.fingerprint": manifest["fingerprint"],
        "dplg.probe": json.dumps(manifest["probe"]), "dplg.model": manifest["model"]})
    _write_parquet(shard_path(out, i), pa.table({
        "name": pa.array(names, pa.string()), "descriptor": column,
        "status": pa.array(["ok" if e is None else e[0] for e in errors], pa.string())},
        schema=schema))


def _partial_schema(dim, fingerprint):
    import pyarrow as pa

    return pa.schema([("index", pa.int32()), ("name", pa.string()),
                      ("descriptor", pa.list_(pa.float32(), dim)), ("status", pa.string()),
                      ("reason", pa.string())], metadata={"dplg.fingerprint": fingerprint})


def write_partial(out, i, names, rows, manifest):
    """Save the rows of unfinished shard `i` gathered so far: `rows` maps an
    index within the shard to (descriptor, None or (status, reason)); names are
    the shard's names."""
    import pyarrow as pa

    dim = int(manifest["dim"])
    order = sorted(rows)
    flat = pa.array(np.stack([np.asarray(rows[j][0], np.float32) for j in order]).reshape(-1)
                    if order else np.zeros(0, np.float32))
    errors = [rows[j][1] for j in order]
    _write_parquet(shard_path(out, i, "partial"), pa.table({
        "index": pa.array(order, pa.int32()), "name": pa.array([names[j] for j in order]),
        "descriptor": pa.FixedSizeListArray.from_arrays(flat, dim),
        "status": pa.array(["ok" if e is None else e[0] for e in errors]),
        "reason": pa.array(["" if e is None else e[1] for e in errors])},
        schema=_partial_schema(dim, str(manifest["fingerprint"]))))


def read_partial(out, i, names, manifest, damaged=None):
    """{index: (descriptor, None or (status, reason))} of shard `i`'s partial
    file, or {} when there is none; one that does not fit `manifest` and the
    shard's `names` (another model, other inputs, damaged) is set aside as
    *.damaged (and listed in `damaged` as (path, reason)) and its rows
    described again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = shard_path(out, i, "partial")
    if not os.path.isfile(path):
        return {}
    try:
        limit = 8 * (int(manifest["dim"]) + 64) * max(1, len(names)) + (1 << 20)
        if os.path.getsize(path) > limit:   # checked before reading it into memory
            raise ValueError("larger than its rows can be")
        table = pq.read_table(path)
        want = _partial_schema(int(manifest["dim"]), str(manifest["fingerprint"]))
        got = table.schema
        if (got.names != want.names or (got.metadata or {}).get(b"dplg.fingerprint") !=
                want.metadata[b"dplg.fingerprint"]):
            raise ValueError("another schema or model")
        for field in want:   # a list's child name may change through Parquet
            kind = got.field(field.name).type
            if not (kind == field.type or (pa.types.is_fixed_size_list(kind) and
                    kind.list_size == field.type.list_size and
                    kind.value_type == field.type.value_type)):
                raise ValueError(f"column {field.name} is {kind}, not {field.type}")
        index = table.column("index").to_numpy()
        if len(set(index.tolist())) != len(index) or (len(index) and (
                index.min() < 0 or index.max() >= len(names))):
            raise ValueError("indices outside the shard")
        rows = {}
        vectors = np.asarray(table.column("descriptor").combine_chunks().flatten(),
                             np.float32).reshape(len(index), -1)
        for k, (j, name, status, reason) in enumerate(zip(
                index.tolist(), table.column("name").to_pylist(),
                table.column("status").to_pylist(), table.column("reason").to_pylist())):
            if name != names[j]:
                raise ValueError("rows of other images")
            if status == "ok" and not np.all(np.isfinite(vectors[k])):
                raise ValueError("non-finite descriptors")
            rows[j] = (vectors[k], None if status == "ok" else (status, reason))
        return rows
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        set_aside(path)
        if damaged is not None:
            damaged.append((path, str(e) or type(e).__name__))
        return {}


def remove_partial(out, i):
    try:
        os.remove(shard_path(out, i, "partial"))
    except FileNotFoundError:
        pass


def check_complete(out):
    """The manifest of a finished extraction folder, or a UserError (a damaged
    shard is named: it is set aside, and the same command describes it again)."""
    manifest = read_manifest(out)
    for key in ("num_shards", "dim", "probe", "shard_size", "images", "fingerprint"):
        if key not in manifest:
            raise UserError(f"{out}/manifest.json has no {key!r}: the extraction never "
                            "started or the file was changed; rerun dplg-extract.")
    for i in range(manifest["num_shards"]):
        path = shard_path(out, i)
        problem = check_shard(path, manifest, i) if os.path.isfile(path) else None
        if problem:
            raise UserError(f"{path} is damaged ({problem}); rerun the same dplg-extract "
                            "command, which describes that shard again.")
    missing = manifest["num_shards"] - len(done_shards(out, manifest["num_shards"]))
    if missing:
        raise UserError(f"{out} is unfinished: {missing} of {manifest['num_shards']} shards "
                        "are missing; rerun the same dplg-extract command to finish it.")
    return manifest


def iter_descriptors(out):
    """(names, descriptors [n, D] float32) of each shard in order, the refused
    images left out; one shard in memory at a time."""
    import pyarrow.parquet as pq

    manifest = check_complete(out)
    dim = int(manifest["dim"])
    for i in range(manifest["num_shards"]):
        try:
            table = pq.read_table(shard_path(out, i))
        except Exception as e:  # noqa: BLE001 - Arrow's errors of a damaged file
            raise UserError(f"{shard_path(out, i)} cannot be read ({type(e).__name__}); "
                            "rerun the same dplg-extract command.") from None
        ok = np.asarray(table.column("status").to_pylist()) == "ok"
        names = [n for n, good in zip(table.column("name").to_pylist(), ok) if good]
        column = table.column("descriptor").combine_chunks()
        # the child values hold a (zero) row for each null too
        values = column.values.to_numpy(zero_copy_only=False)[column.offset * dim:]
        rows = np.asarray(values, np.float32)[:len(table) * dim].reshape(-1, dim)[ok]
        if not np.all(np.isfinite(rows)):
            raise UserError(f"{shard_path(out, i)} holds NaN or infinite descriptors; delete "
                            "it and rerun the same dplg-extract command.")
        yield names, rows


def read_errors(out):
    """[(name, reason)] of every committed shard."""
    import pyarrow.parquet as pq

    errors = []
    manifest = read_manifest(out)
    for i in sorted(done_shards(out, manifest["num_shards"])):
        try:
            table = pq.read_table(shard_path(out, i, "errors"))
            errors += list(zip(table.column("name").to_pylist(),
                               table.column("reason").to_pylist()))
        except Exception as e:  # noqa: BLE001 - Arrow's errors of a damaged file
            raise UserError(f"{shard_path(out, i, 'errors')} cannot be read "
                            f"({type(e).__name__}); rerun the same dplg-extract command.") \
                from None
    return errors


def read_all(out, dim=None):
    """(descriptors [N, D], names, probe) of a finished extraction folder."""
    manifest = check_complete(out)
    if dim is not None and int(manifest["dim"]) != dim:
        raise UserError(f"{out} holds {manifest['dim']}-d descriptors; expected {dim}-d ones "
                        "from the same model.")
    names, parts = [], []
    for shard_names, rows in iter_descriptors(out):
        names += shard_names
        parts.append(rows)
    rows = np.concatenate(parts) if parts else np.zeros((0, int(manifest["dim"])), np.float32)
    return rows, names, np.asarray(manifest["probe"], np.float32)
