"""dplg-extract: describe a whole collection on Ray Data, resumably.

    dplg-extract --model=models/dplg --output_dir=desc photos/ more/*.jpg list.txt
    dplg-extract --model=models/dplg --output_dir=desc --ray_address=HEAD:6379 s3://b/imgs/
    dplg-extract --server=127.0.0.1:8500 --output_dir=desc photos/

Inputs are folders, globs, single files, text files of paths (`.txt`, one
per line) or URIs any pyarrow filesystem reads. They are listed, sorted and
cut into shards of --shard_size; Ray CPU tasks read and check the bytes and
--workers actors, each holding the SavedModel once, describe them in
same-size batches (dplg_tf.bulk.reading); the driver commits each finished shard
as one Parquet file (dplg_tf.storage.extraction). A rerun with the same arguments does
only the shards that are missing, and of an unfinished shard only the
images its partial file (saved every --commit_seconds) does not hold, so a
kill loses about a minute of work; another model, other scales or other
inputs are refused. Without --ray_address a local Ray runtime is started
(and stopped) for the run. Exit 1 when some images were refused (they are
in OUT/errors), 2 on bad usage.
"""

import dataclasses
import fnmatch
import glob
import json
import os
import sys
import time

from dplg_tf.errors import DONE, InputNotFound, PARTLY_FAILED, UserError
from dplg_tf.bulk import leftovers, reading
from dplg_tf import images
from dplg_tf.storage import extraction
from dplg_tf.export.saved_models import fingerprint, resolve_saved_model



@dataclasses.dataclass
class Options:
    """How dplg-extract runs (its flags, README "Bulk extraction")."""

    output_dir: str
    model: str = None             # a SavedModel, or
    server: str = None            # host:port of a model server
    model_name: str = "dplg"
    shard_size: int = 1000
    workers: int = 1
    batch_size: int = 8
    cpus_per_worker: float = 0.0
    gpus_per_worker: float = 0.0
    ray_address: str = None
    num_cpus: int = None
    scales: list = None
    limits: images.Limits = images.DEFAULT_LIMITS
    commit_seconds: float = 60.0  # an unfinished shard's rows are saved this often


# ------------------------------------------------------------------ listing

def list_inputs(inputs):
    """Sorted unique image paths / URIs, and [(input, problem)]."""
    found, problems = [], []
    for item in inputs:
        if "://" in item:
            found += _list_uri(item)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputNotFound(f"{images.display_name(item)} matches no file.")
            found += images.list_images(matches, problems)
        elif item.endswith(".txt") and os.path.isfile(item):
            with open(item, encoding="utf-8", errors="surrogateescape") as f:
                found += [line.strip() for line in f
                          if line.strip() and not line.startswith("#")]
        else:
            found += images.list_images([item], problems)
    return sorted(set(found)), problems


def _list_uri(uri):
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri.split("*")[0].rsplit("/", 1)[0]
                                                  if "*" in uri else uri)
        scheme = uri.split("://", 1)[0]
        info = fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            return [uri]
        entries = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as e:
        raise InputNotFound(f"{uri} cannot be listed: {e}.") from None
    names = [f"{scheme}://{e.path}" for e in entries if e.type == pyarrow.fs.FileType.File
             and e.path.lower().endswith(images.IMAGE_EXTENSIONS)]
    return [n for n in names if "*" not in uri or fnmatch.fnmatch(n, uri)]


# ------------------------------------------------------------- Ray stages

def _expand(row):
    """One row of paths -> one row per image."""
    return [{"shard": row["shard"], "index": j, "path": p}
            for j, p in zip(row["indices"], row["paths"])]


def _read(batch, limits):
    """A Ray task: the bytes of a batch of paths, checked."""
    paths = [str(p) for p in batch["path"]]
    blobs, errors = reading.read_rows(paths, limits)
    return {"shard": batch["shard"], "index": batch["index"], "path": paths,
            "data": [b or b"" for b in blobs], "reason": [e[1] if e else "" for e in errors],
            "status": [e[0] if e else "" for e in errors]}


class _Describe:
    """A Ray actor: the model, loaded once."""

    def __init__(self, model, server, model_name, scales, batch_size, threads):
        from dplg_tf.console import quiet_tensorflow
        from dplg_tf.retrieval.describers import Describer

        quiet_tensorflow()  # each actor is its own process: keep its start-up lines out
        self.worker = Describer(model, server, model_name, scales=scales,
                                batch_size=batch_size, threads=threads)

    def __call__(self, batch):
        import numpy as np

        todo = [i for i, s in enumerate(batch["status"]) if not s]
        rows, errors = self.worker.describe_rows([bytes(batch["data"][i]) for i in todo])
        out = np.zeros((len(batch["path"]), rows.shape[1]), np.float32)
        status, reason = list(batch["status"]), list(batch["reason"])
        for k, i in enumerate(todo):
            out[i] = rows[k]
            if errors[k] is not None:
                status[i], reason[i] = errors[k]
            elif batch["shard"][i] < 0:   # the probe row also tells the scales used
                reason[i] = json.dumps(self.worker.scales)
        return {"shard": batch["shard"], "index": batch["index"], "path": batch["path"],
                "descriptor": out, "status": status, "reason": reason}


def _dataset(options, names, remaining, size, limits, scales, threads, cpus):
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # shard -1: the probe image, described by the same actors (the model's identity);
    # then blocks of one actor batch each, so results stream back as they are made
    chunk = options.batch_size * 4
    items = [{"shard": -1, "indices": [0], "paths": [reading.PROBE]}] + [
        {"shard": s, "indices": left[k:k + chunk],
         "paths": [names[s * size + j] for j in left[k:k + chunk]]}
        for s, left in remaining.items() for k in range(0, len(left), chunk)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(_expand, num_cpus=0.05)
    ds = ds.map_batches(_read, fn_kwargs={"limits": limits}, batch_size=options.batch_size,
                        num_cpus=0.05)
    return ds.map_batches(
        _Describe, fn_constructor_args=(options.model and resolve_saved_model(options.model),
                                        options.server, options.model_name, scales,
                                        options.batch_size, threads),
        batch_size=chunk, num_cpus=cpus,
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_gpus=options.gpus_per_worker or None)


# ------------------------------------------------------------------ driver

def _peak_rss_mb():
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not the parent's
    before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


class _Progress:
    """The console bar and OUT/progress.json."""

    def __init__(self, out, total, shards_total, shards_done):
        from dplg_tf.console import progress_bar

        self.path = os.path.join(out, "progress.json")
        self.total, self.done, self.errors = total, 0, 0
        self.shards_total, self.shards_done = shards_total, shards_done
        self.start, self.last, self.first = time.time(), 0.0, None
        self.bar = progress_bar(total, "images")

    def update(self, images_done, errors, shard_finished=False):
        if images_done and self.first is None:   # the steady rate starts here
            self.first = (time.time(), images_done)
        self.done += images_done
        self.errors += errors
        self.shards_done += int(shard_finished)
        self.bar.update(images_done)
        self.bar.set_postfix(shards=f"{self.shards_done}/{self.shards_total}",
                             errors=self.errors, refresh=False)
        if shard_finished or time.time() - self.last > 2.0:
            self.write("running")

    def write(self, state):
        from dplg_tf.storage.atomic import write_atomic

        elapsed = time.time() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        steady = None
        if self.first and self.done > self.first[1] and time.time() > self.first[0]:
            steady = (self.done - self.first[1]) / (time.time() - self.first[0])
        write_atomic(self.path, json.dumps({
            "state": state, "images_done": self.done, "images_total": self.total,
            "images_per_sec": round(rate, 3), "shards_done": self.shards_done,
            "steady_images_per_sec": steady and round(steady, 3),
            "shards_total": self.shards_total, "errors": self.errors,
            "elapsed_s": round(elapsed, 1),
            "eta_s": round((self.total - self.done) / rate, 1) if rate else None,
            "driver_peak_rss_mb": _peak_rss_mb()},
            indent=1).encode())
        self.last = time.time()


def _collect(ds, out, names, size, manifest, progress, pending, commit_seconds=60.0):
    """Gather the described rows by shard (`pending`: the rows kept from
    partial files); once the probe row has settled the manifest
    (dplg_tf.storage.extraction.open_folder), commit each shard when complete,
    and save the rows of unfinished ones every `commit_seconds`."""
    written, ready, dirty, saved = set(), False, set(), time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        new = bad_new = 0
        for k in range(len(batch["shard"])):
            shard, index = int(batch["shard"][k]), int(batch["index"][k])
            bad = str(batch["status"][k])
            if shard < 0:
                if bad:
                    raise RuntimeError(f"The model refused the probe image: "
                                       f"{batch['reason'][k]}")
                if not ready:
                    probe = batch["descriptor"][k]
                    manifest.update(probe=[float(v) for v in probe], dim=len(probe),
                                    scales=json.loads(str(batch["reason"][k])))
                    extraction.open_folder(out, manifest, names)
                ready = True
                continue
            rows = pending.setdefault(shard, {}) if shard not in written else None
            if rows is None or index in rows:   # a retried batch (a lost worker) repeats rows
                continue
            rows[index] = (batch["descriptor"][k], (bad, str(batch["reason"][k]))
                           if bad else None)
            new, bad_new = new + 1, bad_new + bool(bad)
            dirty.add(shard)
        progress.update(new, bad_new)
        for s in [s for s, rows in pending.items() if ready
                  and len(rows) == len(names[s * size:(s + 1) * size])]:
            _commit(out, s, names[s * size:(s + 1) * size], pending.pop(s), manifest)
            extraction.remove_partial(out, s)
            written.add(s)
            dirty.discard(s)
            progress.update(0, 0, shard_finished=True)
        if ready and dirty and time.monotonic() - saved >= commit_seconds:
            for s in sorted(dirty):
                extraction.write_partial(out, s, names[s * size:(s + 1) * size], pending[s],
                                         manifest)
            dirty, saved = set(), time.monotonic()


def _commit(out, shard, names, rows, manifest):
    import numpy as np

    order = sorted(rows)
    extraction.write_shard(out, shard, names, np.stack([rows[j][0] for j in order]),
                       [rows[j][1] for j in order], manifest)


def _start_ray(options):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # local workers inherit it
    common = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=True)
    if options.ray_address:
        ray.init(address=options.ray_address, **common)
        return ray, None
    context = ray.init(address="local", num_cpus=options.num_cpus, **common)
    return ray, context.address_info["session_dir"]   # ray.init's public answer


def extract(inputs, options):
    """Run an extraction of `inputs` into options.output_dir; returns the exit code."""
    if bool(options.model) == bool(options.server):
        raise UserError("Give exactly one of --model (a SavedModel) or --server.")
    if options.server and options.scales:
        raise UserError("--scales needs --model: a server describes at its own scales.")
    inputs = list(inputs)
    if not inputs:
        raise UserError("Name the images to describe: folders, globs, files or .txt "
                            "listings, after the flags.")
    names, problems = list_inputs(inputs)
    for name, reason in problems[:20]:
        print(f"dplg-extract: not listed: {name}: {reason}", file=sys.stderr)
    if not names:
        raise UserError("No image files found in " + ", ".join(inputs) + ".")
    limits = options.limits
    scales = images.check_positive_scales(options.scales) if options.scales else None
    manifest = {"limits": {k: getattr(limits, images.LIMIT_FLAGS[k][0]) for k in images.READ_LIMITS},
                "listing_sha256": extraction.listing_hash(names), "images": len(names),
                "shard_size": options.shard_size, "requested_scales": scales,
                "fingerprint": fingerprint(resolve_saved_model(options.model))
                if options.model else f"grpc://{options.server}/{options.model_name}"}
    extraction.check_folder(options.output_dir, manifest)   # refused before Ray starts
    stopped = leftovers.reap(options.output_dir)
    if stopped:
        print(f"dplg-extract: stopped {stopped} Ray processes left running by a killed run "
              f"into {options.output_dir}", file=sys.stderr)
    ray, session_dir = _start_ray(options)
    try:
        if session_dir:   # a local runtime: its processes are ours to reap
            leftovers.record(options.output_dir, session_dir)
        return _run(options, ray, names, limits, manifest)
    finally:
        ray.shutdown()
        leftovers.forget(options.output_dir)


def _run(options, ray, names, limits, manifest):
    out, size = options.output_dir, options.shard_size
    count = (len(names) + size - 1) // size
    manifest.update(format=1, model=options.model and resolve_saved_model(options.model)
                    or manifest["fingerprint"], num_shards=count)
    os.makedirs(out, exist_ok=True)   # progress.json goes here before the manifest
    damaged = []
    existing = extraction.read_manifest(out) if os.path.isfile(
        os.path.join(out, "manifest.json")) else None
    done = extraction.done_shards(out, count, existing, damaged)
    todo = [s for s in range(count) if s not in done]
    pending = {}
    if existing is not None and "dim" in existing:
        for s in todo:
            rows = extraction.read_partial(out, s, names[s * size:(s + 1) * size], existing,
                                           damaged)
            if rows:
                pending[s] = rows
    for path, reason in damaged:
        print(f"dplg-extract: {path} is damaged ({reason}): it is described again",
              file=sys.stderr)
    kept_rows = sum(len(rows) for rows in pending.values())
    if done or damaged or kept_rows:
        print(f"dplg-extract: resuming {out}: {len(done)} of {count} shards kept, "
              f"{kept_rows} images of unfinished shards kept, {len(damaged)} damaged",
              file=sys.stderr)
    remaining = {s: [j for j in range(len(names[s * size:(s + 1) * size]))
                     if j not in pending.get(s, {})] for s in todo}
    remaining = {s: left for s, left in remaining.items() if left}
    total = sum(len(left) for left in remaining.values())
    progress = _Progress(out, total, count, len(done))
    cpus = options.cpus_per_worker or max(
        0.5, (ray.cluster_resources().get("CPU", 1) - 0.2) / options.workers)
    threads = max(1, round(options.cpus_per_worker or ray.cluster_resources().get("CPU", 1)
                           / options.workers))
    if todo:
        _collect(_dataset(options, names, remaining, size, limits, manifest["requested_scales"],
                          threads, cpus), out, names, size, manifest, progress, pending,
                 options.commit_seconds)
    progress.bar.close()
    progress.write("done")
    errors = extraction.read_errors(out)
    print(f"{out}: {len(names) - len(errors)} of {len(names)} images described in {count} "
          f"shards ({len(done)} kept from before); {len(errors)} refused.")
    for name, reason in errors[:20]:
        print(f"dplg-extract: skipped {name}: {reason}", file=sys.stderr)
    return PARTLY_FAILED if errors else DONE
