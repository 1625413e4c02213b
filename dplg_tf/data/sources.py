"""Where dplg-build-tfrecords finds its images: a folder with one sub-folder
per class, or Google Landmarks v2 (train.csv or train_clean.csv)."""

import csv
import os

from dplg_tf.errors import UserError
from dplg_tf.images import BUILDER_EXTENSIONS



class BuildError(UserError):
    """A problem with the builder's input or output folder."""


def list_image_dir(image_dir, problems=None):
    """[(path, image_id, class_name)] from a folder with one sub-folder per class.

    A file name that is not valid UTF-8 is kept: its image_id holds the
    undecodable bytes as surrogate escapes (os.fsdecode), and the record
    stores them as they are (make_example). Class folders whose names are
    not valid UTF-8 (relabeling.csv is text) and symbolic links that loop or
    lead nowhere are left out and appended to `problems` as [path, reason]."""
    from dplg_tf.images import is_text_name, display_name

    problems = problems if problems is not None else []
    if not os.path.isdir(image_dir):
        raise BuildError(f"--image_dir {image_dir!r} is not a folder.")
    items, ignored = [], 0

    def usable(path, name, folder=False):
        if folder and not is_text_name(name):
            problems.append([display_name(path), "folder name is not valid UTF-8"])
            return False
        if os.path.islink(path) and not os.path.exists(path):
            problems.append([display_name(path), "broken or looping symbolic link"])
            return False
        return not name.startswith(".")

    classes = sorted(d for d in os.listdir(image_dir)
                     if usable(os.path.join(image_dir, d), d, folder=True)
                     and os.path.isdir(os.path.join(image_dir, d)))
    if not classes:
        raise BuildError(f"--image_dir {image_dir!r} has no class sub-folders.")
    for cls in classes:
        folder = os.path.join(image_dir, cls)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not usable(path, name) or not os.path.isfile(path):
                continue
            if not name.lower().endswith(BUILDER_EXTENSIONS):
                ignored += 1
                continue
            items.append((path, f"{cls}/{os.path.splitext(name)[0]}", cls))
    return items, ignored


def list_gldv2(csv_path, image_dir):
    """[(path, image_id, landmark_id)] from GLDv2 train.csv or train_clean.csv."""
    if not os.path.isfile(csv_path):
        raise BuildError(f"--gldv2_csv {csv_path!r} does not exist.")
    items = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if {"id", "landmark_id"} <= fields:
            pairs = ((row["id"], row["landmark_id"]) for row in reader)
        elif {"landmark_id", "images"} <= fields:
            pairs = ((image_id, row["landmark_id"]) for row in reader
                     for image_id in row["images"].split())
        else:
            raise BuildError(
                f"{csv_path!r} has columns {sorted(fields)}; expected GLDv2 train.csv "
                "(id,url,landmark_id) or train_clean.csv (landmark_id,images).")
        for image_id, landmark in pairs:
            path = os.path.join(image_dir, image_id[0], image_id[1], image_id[2],
                                image_id + ".jpg")
            items.append((path, image_id, int(landmark)))
    if not items:
        raise BuildError(f"{csv_path!r} lists no images.")
    return items


def read_landmark_list(path):
    """The set of class ids (as text) in `path`: ids separated by commas, spaces
    or new lines, `#` comments, an optional header word (landmark_id)."""
    import re

    if not os.path.exists(path):
        raise BuildError(f"--exclude_landmarks {path!r} does not exist.")
    if not os.path.isfile(path):
        raise BuildError(f"--exclude_landmarks {path!r} is not a file; give a text file "
                         "of landmark ids.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"--exclude_landmarks {path!r} cannot be read as text "
                         f"({type(e).__name__}); give one landmark id a line.") from None
    tokens = re.split(r"[\s,]+", re.sub(r"#.*", "", text).strip())
    if tokens and tokens[0] in ("landmark_id", "landmark", "id"):
        tokens = tokens[1:]
    ids = {t for t in tokens if t}
    if not ids:
        raise BuildError(f"--exclude_landmarks {path!r} lists no landmark ids.")
    return ids


def exclude_landmarks(items, path):
    """(the items whose class is not listed in `path`, what was excluded: the
    report's {"file", "listed", "found", "images"})."""
    ids = read_landmark_list(path)
    kept = [item for item in items if str(item[2]) not in ids]
    found = {str(item[2]) for item in items} & ids
    return kept, {"file": path, "listed": len(ids), "found": len(found),
                  "images": len(items) - len(kept)}


def present(items):
    """(items whose file exists and is non-empty, [[path, reason]] of the others).

    A stat per file, so that a missing or empty file never takes a place in
    the validation split; other bad files are found when shards are written.
    """
    kept, missing = [], []
    for item in items:
        try:
            size = os.stat(item[0]).st_size
        except FileNotFoundError:
            missing.append([item[0], "missing"])
            continue
        except OSError as e:
            missing.append([item[0], f"unreadable: {e.strerror or e}"])
            continue
        if size == 0:
            missing.append([item[0], "empty file"])
        else:
            kept.append(item)
    return kept, missing
