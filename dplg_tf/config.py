"""The configuration tree shared by configs/, the model, training and export.

`base_config()` holds the paper's recipe (section 3.4); the files in configs/
change a few fields of it. `validate(config)` checks a tree and raises one
clear sentence on the first wrong value; the names of backbones and heads
are checked by dplg_tf.nn.model.validate, which `build_dplg` calls.
`config_file(name)` finds a file of configs/, in a checkout or a wheel. This
module sits at the bottom with dplg_tf.errors.
"""

import math
import os

import ml_collections

from dplg_tf.errors import UserError

PAPER_SCALES = (1 / (2 * math.sqrt(2)), 0.5, 1 / math.sqrt(2), 1.0, math.sqrt(2))


def config_file(name):
    """The path of the shipped config `name` (e.g. "demo_cpu.py"): in an
    installed wheel, its copy of configs/ (dplg_tf/configs, mapped so in
    pyproject.toml); in a checkout, which has no such folder, configs/ beside
    the package, the files users edit."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "configs")
    folder = installed if os.path.isdir(installed) else os.path.join(
        os.path.dirname(package), "configs")
    return os.path.join(folder, name)


def base_config():
    """The paper's recipe: ResNet50, DPLG head, GLDv2-clean, 512x512, D=512."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"            # a name of dplg_tf.nn.backbones.BACKBONES
    c.model.backbone_weights = None          # None | "imagenet" | a weights file (.h5, .pth, ...)
    c.model.preprocessing = ""               # "" = the backbone's own (caffe, torch, lite, unit)
    c.model.head = "dplg"                    # one of dplg_tf.nn.heads.HEADS
    c.model.head_init = "random"             # "identity": start at the backbone's GeM vector
    c.model.descriptor_dim = 512             # D of the final FC; 0 = no FC (head gem only)
    c.model.local_dim = 1024                 # D4: width of V'g, X'4, Q, K and V
    c.model.gem_p = 3.0
    c.model.gem_trainable = False
    c.model.rfb_branch_filters = 0           # 0 means local_dim // 4
    c.model.rfb_batchnorm = True
    c.model.min_image_size = 64              # smaller images are refused

    c.loss = ml_collections.ConfigDict()
    c.loss.num_classes = 81313               # GLDv2-clean; 0 = read from the data
    c.loss.arcface_margin = 0.15
    c.loss.arcface_scale = 30.0

    c.data = ml_collections.ConfigDict()
    c.data.train_pattern = ""
    c.data.validation_pattern = ""
    c.data.num_train_records = 0             # 0 = from dataset_info.json or counted once
    c.data.image_size = 512                  # square training crops
    c.data.random_resized_crop = True        # else the whole image, resized
    c.data.crop_area_range = (0.05, 1.0)     # share of the image a crop covers
    c.data.aspect_ratio_range = (3 / 4, 4 / 3)
    c.data.random_flip = True
    c.data.colour_jitter = 0.0               # 0 = off; 1 = +-40% brightness etc.
    c.data.shuffle_buffer = 10000
    c.data.num_parallel_reads = 8

    c.train = _train_config()

    c.profile_steps = ""                     # "first,last": profiler trace window

    c.eval = ml_collections.ConfigDict()
    c.eval.scales = list(PAPER_SCALES)
    c.eval.max_image_side = 1024
    return c


def _train_config():
    """config.train: the optimiser, schedule, checkpoints and logging."""
    t = ml_collections.ConfigDict()
    t.batch_size = 64                  # global batch, over all replicas
    t.epochs = 100
    t.max_steps = 0                    # 0 = derived from epochs and the data
    t.optimizer = "sgd"
    t.momentum = 0.9
    t.learning_rate = 0.03             # the paper's; taken as the rate for lr_base_batch
    t.lr_scaling = "none"              # "linear": learning_rate * batch_size / lr_base_batch
    t.lr_base_batch = 64
    t.lr_schedule = "cosine"
    t.warmup_steps = 0
    t.weight_decay = 1e-4
    t.weight_decay_mode = "decoupled"  # "coupled": L2 in the loss (DOLG, pycls)
    t.clip_norm = 10.0
    t.mixed_precision = ""             # "" | mixed_float16 | mixed_bfloat16
    t.jit_compile = False
    t.frozen_batchnorm = False
    t.backbone_lr_multiplier = 1.0     # the backbone's learning rate relative to the head's
    t.backbone_frozen_steps = 0        # the backbone is not updated for these first steps
    t.seed = 0
    t.checkpoint_every = 1000          # steps; and always at the end
    t.keep_checkpoints = 3
    t.log_every = 50
    t.eval_every = 5000                # 0 = only at the end
    t.eval_batches = 50
    t.summary_images = 4               # attention maps in TensorBoard
    t.debug_nan_step = -1              # fault injection: NaN loss at this step (1-based)
    return t


def _fail(message):
    raise UserError(message)


def validate(config):
    """Raise UserError naming the first wrong field of `config`; return it."""
    m = config.model if "model" in config else config
    for field in ("descriptor_dim", "local_dim"):
        value = m[field]
        if not isinstance(value, int) or value < 0 or (value == 0 and (
                field == "local_dim" or m.head != "gem")):
            _fail(f"config.model.{field} must be a positive integer (descriptor_dim 0, no "
                  f"final FC, only with head 'gem'), got {value!r}.")
    if m.get("preprocessing", "") not in ("", "caffe", "torch", "lite", "unit"):
        _fail(f"config.model.preprocessing={m.preprocessing!r} is unknown; use '' (the "
              "backbone's own), 'caffe', 'torch', 'lite' or 'unit'.")
    if m.get("head_init", "random") not in ("random", "identity"):
        _fail(f"config.model.head_init={m.head_init!r} is unknown; use 'random' or 'identity'.")
    if not m.gem_p > 0:
        _fail(f"config.model.gem_p must be > 0, got {m.gem_p!r}.")
    if m.rfb_branch_filters < 0:
        _fail(f"config.model.rfb_branch_filters must be >= 0, got {m.rfb_branch_filters!r}.")
    if m.min_image_size < 32:
        _fail(f"config.model.min_image_size must be >= 32 (one X5 cell), "
              f"got {m.min_image_size!r}.")
    if "loss" in config:
        loss = config.loss
        if loss.num_classes < 0:
            _fail(f"config.loss.num_classes must be >= 0, got {loss.num_classes!r}.")
        if not 0 <= loss.arcface_margin < math.pi / 2:
            _fail(f"config.loss.arcface_margin must lie in [0, pi/2), "
                  f"got {loss.arcface_margin!r}.")
        if not loss.arcface_scale > 0:
            _fail(f"config.loss.arcface_scale must be > 0, got {loss.arcface_scale!r}.")
    if "train" in config:
        t = config.train
        if t.batch_size <= 0:
            _fail(f"config.train.batch_size must be > 0, got {t.batch_size!r}.")
        if not t.learning_rate > 0:
            _fail(f"config.train.learning_rate must be > 0, got {t.learning_rate!r}.")
        if t.lr_scaling not in ("none", "linear") or t.lr_base_batch <= 0:
            _fail(f"config.train.lr_scaling must be 'none' or 'linear' and lr_base_batch > 0, "
                  f"got {t.lr_scaling!r} and {t.lr_base_batch!r}.")
        if not 0 <= t.get("backbone_lr_multiplier", 1.0) <= 10 or t.get(
                "backbone_frozen_steps", 0) < 0:
            _fail("config.train.backbone_lr_multiplier must lie in [0, 10] and "
                  "backbone_frozen_steps be >= 0, got "
                  f"{t.backbone_lr_multiplier!r} and {t.backbone_frozen_steps!r}.")
        if t.mixed_precision not in ("", "mixed_float16", "mixed_bfloat16"):
            _fail(f"config.train.mixed_precision={t.mixed_precision!r} is unknown; "
                  "use '', 'mixed_float16' or 'mixed_bfloat16'.")
    if "data" in config:
        d = config.data
        lo, hi = d.crop_area_range
        if not 0 < lo <= hi <= 1:
            _fail(f"config.data.crop_area_range must satisfy 0 < low <= high <= 1, "
                  f"got {tuple(d.crop_area_range)}.")
    if "data" in config and config.data.image_size < m.min_image_size:
        _fail(f"config.data.image_size={config.data.image_size} is below "
              f"config.model.min_image_size={m.min_image_size}.")
    return config
