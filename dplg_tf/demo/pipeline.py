"""The demo's pipeline: the whole system on generated data, on 2 CPU cores.

generate synthetic landmarks -> build TFRecords -> train the demo_cpu config
-> export the untrained and the trained model -> start dplg-serve -> index
the database through gRPC -> the search server over HTTP -> evaluate both
models (Revisited protocol) -> write pictures -> stop the server. `run`
prints the mAP table of the untrained and the trained model side by side and
where the pictures are. Every stage keeps its output in the work folder and
is skipped when already complete, so an interrupted demo resumes.
`describe` only builds the model and describes a generated image.
dplg-demo (cli/demo.py) is its command.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from dplg_tf.images.attention import ascii_map
from dplg_tf.images.probe import facade_image
from dplg_tf.storage.atomic import atomic_path, write_atomic


def describe(config, height=192, width=256, seed=0, output=""):
    """Build the model and describe a generated image; `output`: an .npz for
    the image, its descriptor and its attention."""
    import keras

    from dplg_tf.nn import costs
    from dplg_tf.nn.model import build_dplg

    m = config.model
    print(f"dplg_tf demo: backbone={m.backbone} head={m.head} "
          f"descriptor_dim={m.descriptor_dim} (keras {keras.__version__}, "
          f"backend {keras.backend.backend()})")
    model = build_dplg(config)
    image = facade_image(height, width, seed)
    start = time.perf_counter()
    out = model(image[None].astype(np.float32))
    seconds = time.perf_counter() - start
    descriptor = np.asarray(out["descriptor"])[0]
    attention = np.asarray(out["attention"])[0]
    gmacs = costs.count_macs(model, height, width) / 1e9
    print(f"image {height}x{width} -> descriptor {descriptor.shape}, "
          f"L2 norm {np.linalg.norm(descriptor):.6f}, first values "
          f"{np.array2string(descriptor[:6], precision=4)}")
    print(f"attention {attention.shape}, sum {attention.sum():.6f}, "
          f"max {attention.max():.4f} (uniform would be {1 / attention.size:.4f}):")
    print(ascii_map(attention))
    print(f"parameters {model.count_params() / 1e6:.2f} M, {gmacs:.3f} GMACs "
          f"for this image, first call {seconds:.2f} s")
    if output:
        path = output if output.endswith(".npz") else output + ".npz"
        with atomic_path(path) as tmp:   # ends in .npz, so np.savez keeps the name
            np.savez(tmp, image=image, descriptor=descriptor, attention=attention)
        print(f"wrote {path}")


# ------------------------------------------------------------ the pipeline

# measured by `dplg-demo` on a 2-core AMD EPYC on 2026-11-27 (see README):
# numpy's float32 matmul speed there, and the demo's time (training, the rest)
_REFERENCE = {"gflops": 134.0, "train_seconds": 530.0, "other_seconds": 67.0, "steps": 900}


def matmul_gflops(size=1024, timings=9, clock=time.perf_counter):
    """This machine's float32 matrix-multiply speed (numpy's BLAS), GFLOP/s:
    the best of several short timings, so that other work running during
    part of the measurement does not make the machine look slow."""
    a = np.random.default_rng(0).random((size, size), np.float32)
    a @ a  # warm-up
    best = float("inf")
    for _ in range(timings):
        start = clock()
        a @ a
        best = min(best, clock() - start)
    return 2 * size ** 3 / max(best, 1e-9) / 1e9


def estimate(train_steps, gflops=None, load=None):
    """How long the demo should take here, scaled from the reference run at
    this machine's best speed; says so when other work runs now (`load`: the
    1-minute load average, per core), which makes the demo take longer."""
    ref = _REFERENCE
    gflops = gflops or matmul_gflops()
    if not ref["gflops"]:
        return f"this machine: {gflops:.0f} GFLOP/s float32 matmul"
    if load is None:
        load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 0
    seconds = (ref["train_seconds"] * train_steps / ref["steps"]
               + ref["other_seconds"]) * ref["gflops"] / gflops
    busy = (f"; other work keeps the cores {min(load, 1):.0%} busy now, which makes it longer"
            if load > 0.5 else "")
    return (f"this machine: {gflops:.0f} GFLOP/s float32 matmul; the demo should take about "
            f"{seconds / 60:.0f} min here ({(ref['train_seconds'] + ref['other_seconds']) / 60:.0f}"
            f" min on a 2-core machine of {ref['gflops']:.0f} GFLOP/s; --train_steps "
            f"shortens it){busy}")

def _stage(name):
    print(f"\n== {name}", flush=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(base, log_path):
    port, rest_port = _free_port(), _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "dplg_tf.cli.serve",
                             f"--model_base_path={base}", f"--port={port}",
                             f"--rest_api_port={rest_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    from dplg_tf.serving.client import Client, ClientError

    client = Client(f"127.0.0.1:{port}", timeout=30, retries=0)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dplg-serve exited early; see {log_path}")
        try:  # answers LOADING while the version loads and replays its warm-up file
            if any(state == "AVAILABLE" for _, state in client.status()):
                return proc, f"127.0.0.1:{port}", f"127.0.0.1:{rest_port}"
        except ClientError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"dplg-serve did not answer within 180 s; see {log_path}")


def run(config, workdir, config_path, overrides=None, train_steps=900, num_landmarks=60,
        views_per_landmark=20, figures=3):
    """The whole demo in `workdir` (see the module docstring); `config_path`
    and `overrides` ({dotted key: value}) are given to dplg-train as they are."""
    from dplg_tf.retrieval import eval_run, evaluation

    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    print(estimate(train_steps))
    data = _synthetic_data(workdir, num_landmarks, views_per_landmark)
    shards = _shards(workdir, data)
    run_dir = _train(config, workdir, shards, config_path, overrides, train_steps)
    untrained_base, trained_base = _export(config, workdir, run_dir)
    _stage("5/9 dplg-serve on the trained model")
    server, address, rest = _start_server(trained_base, os.path.join(workdir, "serve.log"))
    print(f"serving on {address} (gRPC) and http://{rest} (REST; log "
          f"{os.path.join(workdir, 'serve.log')})")
    try:
        _index(config, workdir, data, address)
        _search_service(workdir, data, address, rest)
        _stage("8/9 evaluate (Revisited protocol, 5 scales) and draw")
        results = {}
        results["untrained"] = eval_run.run_eval(
            "synthetic", data, model=untrained_base,
            output_dir=os.path.join(workdir, "eval_untrained"))[0]
        results["trained"] = eval_run.run_eval(
            "synthetic", data, server=address, figures=figures,
            output_dir=os.path.join(workdir, "eval_trained"))[0]
    finally:
        _stage("9/9 stop the server")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        print(f"dplg-serve exited with {server.returncode}")

    table = evaluation.markdown_table(results)
    write_atomic(os.path.join(workdir, "results.md"), table + "\n")
    print("\nmAP and mP@k (%) on the synthetic evaluation set, untrained vs trained:\n")
    print(table)
    print(f"\npictures: {os.path.join(workdir, 'eval_trained', 'figures')}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return results


def _synthetic_data(workdir, num_landmarks, views_per_landmark):
    from dplg_tf.data import synthetic

    data = os.path.join(workdir, "data")
    _stage("1/9 synthetic landmarks")
    if not os.path.isfile(os.path.join(data, "synthetic.json")):
        print(json.dumps(synthetic.generate(
            data, num_landmarks=num_landmarks, views_per_landmark=views_per_landmark,
            num_eval_landmarks=12, queries_per_landmark=2, db_per_landmark=12,
            num_distractors=120, width=192, height=144, seed=0)))
    else:
        print(f"have {data}")
    return data


def _shards(workdir, data):
    from dplg_tf.data import tfrecords

    _stage("2/9 TFRecord shards")
    shards = os.path.join(workdir, "shards")
    items, ignored = tfrecords.list_image_dir(os.path.join(data, "train"))
    print(json.dumps(tfrecords.build(shards, items, num_shards=4, ignored=ignored,
                                       validation_fraction=0.2)))
    return shards


def _train(config, workdir, shards, config_path, overrides, train_steps):
    """dplg-train on the demo config (with the user's --config.* overrides)."""
    _stage(f"3/9 training {config.model.backbone}+{config.model.head}, "
           f"{train_steps} steps")
    run = os.path.join(workdir, "run")
    overrides = dict(overrides or {})
    overrides.update({"data.train_pattern": os.path.join(shards, "train-*"),
                      "data.validation_pattern": os.path.join(shards, "validation-*"),
                      "train.max_steps": train_steps,
                      "train.checkpoint_every": 100, "train.log_every": 50})
    result_path = os.path.join(run, "result.json")
    if not os.path.isfile(result_path):
        cmd = [sys.executable, "-m", "dplg_tf.cli.train", f"--workdir={run}", "--cpu_devices=1",
               f"--config={config_path}"] + [
            f"--config.{key}={_flag_value(value)}" for key, value in overrides.items()]
        subprocess.run(cmd, check=True)
    with open(result_path) as f:
        trained = json.load(f)
    accuracy, rate = trained["validation_accuracy"], trained.get("images_per_sec")
    print(f"loss {trained['first_loss']:.3f} -> {trained['last_loss']:.3f}, validation "
          f"accuracy {'-' if accuracy is None else f'{accuracy:.3f}'}, "
          f"{'-' if rate is None else f'{rate:.0f}'} images/s")
    return run


def _flag_value(value):
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _export(config, workdir, run):
    from dplg_tf.export import export
    from dplg_tf.nn.model import build_dplg

    _stage("4/9 export (untrained and trained)")
    models = os.path.join(workdir, "models")
    untrained_base, trained_base = os.path.join(models, "untrained"), os.path.join(models, "dplg")
    shape = dict(scales=list(config.eval.scales), max_image_side=config.eval.max_image_side,
                 min_scaled_side=config.model.min_image_size)
    if not os.path.isdir(untrained_base):
        import keras

        keras.utils.set_random_seed(config.train.seed)
        export.export(build_dplg(config), untrained_base, version=1, **shape)
    if not os.path.isdir(trained_base):
        export.export(export.load_for_export(workdir=run), trained_base, version=1, **shape)
    print(f"{untrained_base}/1 and {trained_base}/1")
    return untrained_base, trained_base


def _index(config, workdir, data, address):
    from dplg_tf.search import index
    from dplg_tf.data.revisited import load_dataset
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.console import progress_bar

    _stage("6/9 index the database through gRPC")
    dataset = load_dataset(data, "synthetic")
    describer = Describer(server=address)
    paths = [dataset.image_path(i) for i in range(len(dataset.imlist))]
    bar = progress_bar(len(paths), "images")
    idx = index.DescriptorIndex(config.model.descriptor_dim, "exact", describer.probe())
    names, rows, errors = describer.describe_files(paths, progress=bar)
    if errors:
        raise RuntimeError(f"the demo's images could not all be described: {errors[:3]}")
    idx.add(rows, names)
    bar.close()
    idx.save(os.path.join(workdir, "index"))
    q = dataset.load_query(0)
    hits = idx.search(describer.describe_bytes([_png(q)]), 3)[1][0]
    print(f"{len(idx)} images indexed; query {dataset.qimlist[0]} -> "
          + ", ".join(os.path.basename(idx.names[i]) for i in hits))


def _search_service(workdir, data, address, rest):
    """The index behind the search server (in this process, describing through
    dplg-serve) and one query over HTTP; dplg-serve's REST status too."""
    import base64
    import json
    import urllib.request

    from dplg_tf.data.revisited import load_dataset
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.searcher import Searcher
    from dplg_tf.search.service import SearchServer

    _stage("7/9 the search service over HTTP")
    with urllib.request.urlopen(f"http://{rest}/v1/models/dplg", timeout=60) as r:
        status = json.load(r)["model_version_status"][0]
    print(f"GET http://{rest}/v1/models/dplg -> version {status['version']} {status['state']}")
    describer = Describer(server=address)
    root = workdir if os.path.isabs(workdir) else "."   # where the indexed names resolve
    server = SearchServer(Searcher(os.path.join(workdir, "index"), describer, image_root=root,
                                   reload_seconds=0), "127.0.0.1", 0).start()
    try:
        dataset = load_dataset(data, "synthetic")
        body = json.dumps({"image": {"b64": base64.b64encode(_png(dataset.load_query(1)))
                                     .decode()}, "top_k": 3}).encode()
        request = urllib.request.Request(f"http://{server.address}/v1/search", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
        print(f"POST http://{server.address}/v1/search ({dataset.qimlist[1]}) -> " + ", ".join(
            f"{os.path.basename(h['name'])} {h['score']:.3f}" for h in answer["results"]))
    finally:
        server.stop(5)
        describer.close()
    print("browse it: dplg-search-server --index_dir=" + os.path.join(workdir, "index") +
          " --model=" + os.path.join(workdir, "models", "dplg") + f" --image_root={root}"
          " and open http://127.0.0.1:8600/")


def _png(array):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "PNG")
    return buf.getvalue()
