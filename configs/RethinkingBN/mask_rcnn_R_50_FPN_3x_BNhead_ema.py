# "Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021), Sec. 3-4, as detectron2's
# projects/Rethinking-BatchNorm/configs/mask_rcnn_BNhead.py: Mask R-CNN R-50-FPN, MSRA R-50 with
# frozen BN (FREEZE_AT 2), BN in a 4conv1fc box head and the mask head, 3x = 270k iterations at 16
# images (2 per GPU on 8 GPUs), steps 210k/250k, warm-up 1,000 from 0.001, LR 0.02, no weight
# decay on norms, multi-scale 640-800. Evaluated with BN's EMA population statistics.
from detectron2.model_zoo import get_config

from d2norm.lazy import get_d2norm_config

from ..common.d2norm_recipe import (
    SGD,
    coco_dataloader,
    four_conv_one_fc_heads,
    multi_step_lr,
    resnet50_fpn,
    train_options,
)

model = get_config("common/models/mask_rcnn_fpn.py").model
resnet50_fpn(model, norm="FrozenBN", fpn_norm="", freeze_at=2)
four_conv_one_fc_heads(model, norm="BN")

dataloader = coco_dataloader(min_size_train=(640, 672, 704, 736, 768, 800), total_batch_size=16)
optimizer = SGD
lr_multiplier = multi_step_lr(steps=(210000, 250000), max_iter=270000, warmup_iters=1000, warmup_factor=0.001)
train = train_options(
    max_iter=270000,
    output_dir="output/RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_ema",
    init_checkpoint="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    reference_world_size=8,
)

d2norm = get_d2norm_config()
d2norm.PRECISE_BN.ENABLED = False
