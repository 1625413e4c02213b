import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from dplg_tf import config as config_lib


@pytest.fixture
def small_config():
    """The model of the CPU demo: small backbone, narrow head, 512-d descriptor."""
    c = config_lib.base_config()
    c.model.backbone = "small"
    c.model.local_dim = 32
    c.model.descriptor_dim = 512
    c.loss.num_classes = 7
    c.data.image_size = 64
    return c


def small_dplg(seed=0):
    """A seeded descriptor model with the small backbone (fast on CPU)."""
    import keras

    from dplg_tf.nn.model import build_dplg

    keras.utils.set_random_seed(seed)
    c = config_lib.base_config()
    c.model.backbone = "small"
    c.model.local_dim = 32
    return build_dplg(c)


def image_bytes(h=120, w=160, seed=0, fmt="JPEG", mode="RGB"):
    """An encoded image of seeded noise (JPEG unless told otherwise)."""
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


FIXED_PORTS = (10000, 30000)   # where free_ports looks, when below the ephemeral range


def free_ports(n=1):
    """`n` distinct TCP ports on 127.0.0.1, free now, for a process that takes
    a port number. They are drawn at random below the kernel's ephemeral
    range, which port-0 binds (every server the tests start on port 0) and
    outgoing connections take from, so neither can take them before the
    process binds; only another such draw could, one chance in thousands."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768   # Linux's default
    low, high = FIXED_PORTS[0], min(FIXED_PORTS[1], ephemeral)
    if high - low < 1000:
        raise RuntimeError(f"the ephemeral port range starts at {ephemeral}: no room below it")
    rng, ports = random.SystemRandom(), []
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:   # taken
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports in [{low}, {high})")


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """TFRecord shards of 6 synthetic landmarks x 14 views at 96x96 (train and
    validation), shared by the tests that train."""
    from dplg_tf.data import synthetic, tfrecords

    base = tmp_path_factory.mktemp("train_data")
    synthetic.generate(str(base), num_landmarks=6, views_per_landmark=14, num_eval_landmarks=1,
                       queries_per_landmark=1, db_per_landmark=3, num_distractors=0,
                       width=96, height=96, seed=5, num_workers=1, progress=False)
    items, _ = tfrecords.list_image_dir(str(base / "train"))
    out = str(base / "shards")
    tfrecords.build(out, items, num_shards=4, validation_fraction=0.2, progress=False)
    return out
