# Sec. 5.2, Table 5 (per-level training, per-level population statistics): RetinaNet R-50-FPN
# with SyncBN in the head, normalised per FPN level in training (detectron2's CycleBatchNormList for
# "SyncBN") and evaluated with per-level statistics recalibrated before evaluation (as
# retinanet-eval-domain-specific.py: 500 batches of 8 images = 250 iterations x 16 images). MSRA
# R-50, FREEZE_AT 2, 3x at 16 images (2 per GPU on 8 GPUs), LR 0.01, warm-up 1,000 from 0.001.
# detectron2's own projects/Rethinking-BatchNorm/configs/retinanet_SyncBNhead.py sets the head norm
# to `nn.SyncBatchNorm2d`, which torch does not have: that config (and the two scripts/configs
# importing it) fail to load with an AttributeError.
from detectron2.model_zoo import get_config

from d2norm.lazy import get_d2norm_config

from ..common.d2norm_recipe import SGD, coco_dataloader, multi_step_lr, resnet50_fpn, train_options

model = get_config("common/models/retinanet.py").model
resnet50_fpn(model, norm="FrozenBN", fpn_norm="", freeze_at=2)
model.head.norm = "SyncBN"
model.smooth_l1_beta = 0.0  # MODEL.RETINANET.SMOOTH_L1_LOSS_BETA of Base-RetinaNet.yaml

dataloader = coco_dataloader(min_size_train=(640, 672, 704, 736, 768, 800), total_batch_size=16,
                             use_instance_mask=False)
optimizer = SGD
optimizer.lr = 0.01
lr_multiplier = multi_step_lr(steps=(210000, 250000), max_iter=270000, warmup_iters=1000, warmup_factor=0.001)
train = train_options(
    max_iter=270000,
    output_dir="output/RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead",
    init_checkpoint="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    reference_world_size=8,
)

d2norm = get_d2norm_config()
d2norm.PRECISE_BN.ENABLED = True
d2norm.PRECISE_BN.NUM_ITER = 250
