"""dplg-index: build or extend a FAISS index folder (dplg_tf.search.index).

    dplg-index --index_dir=idx --images=photos/ --server=127.0.0.1:8500   # names: a.jpg, ...
    dplg-index --index_dir=idx --images=photos/a,photos/b --model=models/dplg  # a/x.jpg, ...
    dplg-index --index_dir=idx --descriptors=desc.npz --kind=hnsw
    dplg-index --index_dir=idx --descriptors=more.npz --append
    dplg-index --index_dir=idx --descriptors=extracted/ --kind=ivfpq   # dplg-extract output
"""

import itertools
import os
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.cli.flags import define_index_input_flags, define_query_flags, index_inputs
from dplg_tf.errors import UserError
from dplg_tf.search.index import KINDS, DescriptorIndex, folder_chunks
from dplg_tf.search.names import common_root, relative_names


def _image_root(old, paths):
    """The folder the names are relative to: --image_root, the index's own on
    an append (`old`), else the folder holding the images given; None keeps
    the names as they come (descriptors without --image_root, older indexes)."""
    f = flags.FLAGS
    given = None if f.image_root is None else os.path.abspath(f.image_root)
    if given is not None and not os.path.isdir(given):
        raise UserError(f"--image_root {f.image_root} is not a folder.")
    if old is not None and old.image_root is not None:
        if given is not None and given != old.image_root:
            raise UserError(f"{f.index_dir} names its images relative to {old.image_root}; "
                            "leave --image_root out or give that folder.")
        return old.image_root
    if given is not None or old is not None or not paths:
        return given
    return common_root(paths)


def index_main(argv):
    f = flags.FLAGS
    if f.append and f.overwrite:
        raise UserError("Give --append or --overwrite, not both.")
    if os.path.exists(f.index_dir) and not os.path.isdir(f.index_dir):
        raise UserError(f"--index_dir {f.index_dir} is a file, not a folder.")
    if not f.append and DescriptorIndex.exists(f.index_dir) and not f.overwrite:
        raise UserError(f"{f.index_dir} already holds an index; pass --append to add "
                         "to it or --overwrite to replace it.")
    old = DescriptorIndex.load(f.index_dir) if f.append else None
    if old is not None and f["dba_k"].present and f.dba_k != old.params["dba_k"]:
        raise UserError(f"{f.index_dir} was built with --dba_k={old.params['dba_k']}; "
                        "appends use the index's own setting, so leave --dba_k out.")
    paths = list(f.images or []) + argv[1:]
    root = _image_root(old, paths)
    if root is not None and paths:
        relative_names(paths, root)   # refused before any image is described
    descriptors, names, probe, errors = index_inputs(argv, "dplg-index")
    chunks = iter([(descriptors, names)]) if names is not None else folder_chunks(
        f.descriptors)
    first = next(chunks, None)
    if old is not None:
        index = old
        if probe is not None:
            index.check_probe(probe)
    else:
        index = DescriptorIndex(len(probe) if first is None else first[0].shape[1],
                                f.kind, probe, dba_k=f.dba_k, dba_alpha=f.dba_alpha)
    index.image_root = root
    for descriptors, names in itertools.chain([first] if first else [], chunks):
        if root is not None:   # image paths lie under it; descriptor names need not
            names = relative_names(names, root, strict=bool(paths))
        index.add(descriptors, names)  # one chunk in memory at a time
    index.save(f.index_dir)
    print(f"{f.index_dir}: {len(index)} descriptors ({index.kind}, {index.dim}-d)")
    if errors:
        sys.exit(1)


def run_index():
    define_index_input_flags()
    flags.DEFINE_list("images", None, "Image files or folders to index (also positional).")
    flags.DEFINE_string("image_root", None, "Name the images relative to this folder "
                        "(recorded in the index; default: the folder holding the images "
                        "given). With --descriptors, names under it are made relative too.")
    flags.DEFINE_enum("kind", "exact", list(KINDS), "Index kind.")
    flags.DEFINE_bool("append", False, "Add to an existing index.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing index.")
    define_query_flags(dba=True)  # kept in the index for appends
    cli.run(index_main, "dplg-index")


if __name__ == "__main__":
    sys.exit(run_index())
