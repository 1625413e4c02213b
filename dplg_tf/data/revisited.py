"""Revisited Oxford / Paris (Radenovic et al., CVPR 2018) and the synthetic set.

`load_dataset(data_root, name)` reads `<data_root>/<name>/gnd_<name>.pkl`
with a restricted unpickler (the files come from the internet: only
built-in containers, numbers, strings and NumPy arrays are accepted) and
returns a `RevisitedDataset` with image paths, query crops by `bbx` (PIL's
crop, as the reference code does) and the Easy / Medium / Hard lists.

`python -m dplg_tf.cli.revisited download --data_root DIR --dataset
roxford5k` fetches a data set from the revisitop project's servers, checks
sizes and resumes interrupted downloads. It needs a network; tests never
run it.
"""

import os
import tarfile
import urllib.request

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage import safe_pickle
from dplg_tf.storage.atomic import atomic_path, publish

DATASETS = ("roxford5k", "rparis6k", "synthetic")
PROTOCOLS = ("easy", "medium", "hard")

_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
_IMAGE_URLS = {
    "roxford5k": ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"],
    "rparis6k": ["https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
                 "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz"],
}


def safe_load_pickle(path):
    """The plain data in a ground-truth pickle (dplg_tf.data.safe_pickle)."""
    return safe_pickle.load(path)


def protocol_lists(gnd_entry, protocol):
    """(ok, junk) index arrays of one query under Easy / Medium / Hard.

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard,
    junk = junk. Hard: ok = hard, junk = junk + easy.
    """
    easy = np.asarray(gnd_entry.get("easy", []), dtype=np.int64)
    hard = np.asarray(gnd_entry.get("hard", []), dtype=np.int64)
    junk = np.asarray(gnd_entry.get("junk", []), dtype=np.int64)
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise UserError(f"Unknown protocol {protocol!r}; use one of {PROTOCOLS}.")


def _indices(value, limit, where):
    """A list of database indices in [0, limit), or ValueError."""
    try:
        array = np.asarray(value if value is not None else [])
    except Exception:  # noqa: BLE001
        array = np.asarray([object()])
    if array.size and (array.dtype.kind not in "iu" or array.ndim != 1
                       or array.min() < 0 or array.max() >= limit):
        raise UserError(f"{where} must be a list of database indices in [0, {limit}).")
    return [int(v) for v in array.ravel()]


def check_ground_truth(cfg, name):
    """`cfg` as {imlist, qimlist, gnd} with checked types and ranges, or ValueError."""
    file = f"gnd_{name}.pkl"
    if not isinstance(cfg, dict):
        raise UserError(f"{file} holds a {type(cfg).__name__}, not the dict of a "
                         "Revisited ground-truth file.")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise UserError(f"{file} lacks the {key!r} entry; is it a Revisited "
                             "Oxford/Paris ground-truth file?")
        if not isinstance(cfg[key], list):
            raise UserError(f"{file}: {key!r} must be a list.")
    for key in ("imlist", "qimlist"):
        if not all(isinstance(n, str) and n and "\0" not in n for n in cfg[key]):
            raise UserError(f"{file}: {key!r} must be a list of image names.")
        outside = [n for n in cfg[key] if os.path.isabs(n) or ".." in n.replace("\\", "/")
                   .split("/")]
        if outside:   # names stay inside the data set's jpg/ folder
            raise UserError(f"{file}: {key!r} names {outside[0][:80]!r}, outside the data "
                            "set's folder.")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise UserError(f"{file} has {len(cfg['gnd'])} ground-truth entries for "
                         f"{len(cfg['qimlist'])} queries.")
    n_db, gnd = len(cfg["imlist"]), []
    for i, entry in enumerate(cfg["gnd"]):
        if not isinstance(entry, dict):
            raise UserError(f"{file}: ground-truth entry {i} is not a dict.")
        clean = {k: _indices(entry.get(k), n_db, f"{file}: entry {i}'s {k!r}")
                 for k in ("easy", "hard", "junk", "ok") if k in entry}
        bbx = entry.get("bbx")
        if bbx is not None:
            try:
                bbx = np.asarray(bbx, np.float64).ravel()
            except (TypeError, ValueError, OverflowError):
                bbx = np.zeros(0)
            if bbx.shape != (4,) or not np.all(np.isfinite(bbx)):
                raise UserError(f"{file}: entry {i}'s 'bbx' must be 4 finite numbers.")
        clean["bbx"] = bbx
        gnd.append(clean)
    return {"imlist": cfg["imlist"], "qimlist": cfg["qimlist"], "gnd": gnd}


class RevisitedDataset:
    """A data set in the Revisited layout: `jpg/` and `gnd_<name>.pkl`."""

    def __init__(self, root, name, cfg):
        cfg = check_ground_truth(cfg, name)
        self.root, self.name = root, name
        self.imlist, self.qimlist, self.gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
        self.image_dir = os.path.join(root, "jpg")

    def __repr__(self):
        return (f"RevisitedDataset({self.name!r}, {len(self.imlist)} database images, "
                f"{len(self.qimlist)} queries)")

    def image_path(self, i):
        return os.path.join(self.image_dir, self.imlist[i] + ".jpg")

    def query_path(self, i):
        return os.path.join(self.image_dir, self.qimlist[i] + ".jpg")

    def bbx(self, i):
        """The query's box (left, top, right, bottom), or None for the whole image."""
        box = self.gnd[i]["bbx"]
        return None if box is None else tuple(float(v) for v in box)

    def load_query(self, i):
        """The query image cropped to its box (uint8 RGB array)."""
        from dplg_tf.images import load

        return load(self.query_path(i), bbx=self.bbx(i))

    def positives(self, protocol):
        """[(ok, junk)] per query for protocol easy | medium | hard."""
        return [protocol_lists(g, protocol) for g in self.gnd]

    def label(self, q, index, protocol="medium"):
        """positive / junk / negative of database image `index` for query `q`."""
        ok, junk = protocol_lists(self.gnd[q], protocol)
        if index in ok:
            return "positive"
        return "junk" if index in junk else "negative"

    def ground_truth(self, protocol):
        """Per query {'ok': [...], 'junk': [...]}, the form compute_map takes."""
        return [{"ok": ok, "junk": junk} for ok, junk in self.positives(protocol)]


def load_dataset(data_root, name):
    """The data set `name` under `data_root/<name>/`."""
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise UserError(f"Data set name {name!r} must be a plain folder name under "
                         "--data_root (e.g. roxford5k).")
    root = os.path.join(data_root, name)
    path = os.path.join(root, f"gnd_{name}.pkl")
    if not os.path.isfile(path):
        hint = ("generate it with dplg-synthetic" if name == "synthetic" else
                f"fetch it with: python -m dplg_tf.cli.revisited download "
                f"--data_root {data_root} --dataset {name}")
        raise InputNotFound(f"{path} does not exist; {hint}.")
    return RevisitedDataset(root, name, safe_pickle.load(path))


# ---------------------------------------------------------------- download

def download(url, path, chunk=1 << 20, log=print):
    """Fetch `url` to `path`, resuming a partial `path.part`, checking the size."""
    if os.path.isfile(path):
        log(f"have {path}")
        return path
    part = path + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start again
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            while True:
                block = response.read(chunk)
                if not block:
                    break
                f.write(block)
    size = os.path.getsize(part)
    if expected is not None and size != expected:
        raise IOError(f"{url}: got {size} bytes of {expected}; run the command again to resume.")
    publish(part, path)
    log(f"fetched {path} ({size} bytes)")
    return path


def download_dataset(data_root, name, log=print):
    """Ground truth and images of roxford5k or rparis6k under data_root/name/."""
    if name not in _IMAGE_URLS:
        raise UserError(f"Only roxford5k and rparis6k can be downloaded, not {name!r}.")
    root = os.path.join(data_root, name)
    jpg = os.path.join(root, "jpg")
    os.makedirs(jpg, exist_ok=True)
    download(_GND_URL.format(name=name), os.path.join(root, f"gnd_{name}.pkl"), log=log)
    for url in _IMAGE_URLS[name]:
        archive = download(url, os.path.join(root, os.path.basename(url)), log=log)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    target = os.path.join(jpg, os.path.basename(member.name))
                    if not os.path.isfile(target):   # whole or absent: a rerun skips it
                        with tar.extractfile(member) as src, atomic_path(target) as tmp, \
                                open(tmp, "wb") as dst:
                            dst.write(src.read())
    dataset = load_dataset(data_root, name)
    missing = [p for p in map(dataset.image_path, range(len(dataset.imlist)))
               if not os.path.isfile(p)]
    if missing:
        raise IOError(f"{len(missing)} database images are missing after the download, "
                      f"e.g. {missing[0]}.")
    log(f"{dataset} ready in {root}")
    return dataset
