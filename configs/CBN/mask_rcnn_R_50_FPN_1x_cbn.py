# LazyConfig twin of mask_rcnn_R_50_FPN_1x_cbn.yaml: Cross-Iteration BatchNorm (Yao et al., CVPR
# 2021) COCO recipe. R-50-FPN Mask R-CNN, 1x = 12 COCO epochs at 16 images (2 per GPU on 8 GPUs),
# MSRA R-50 with frozen BN (FREEZE_AT 2), CBN (k = 8, burn-in 3 epochs) in the FPN, a 4conv1fc box
# head and the mask head; official recipe (Howal/Cross-iterationBatchNorm, mmdetection): SGD 0.02
# with weight decay on every parameter, warm-up 500 from 1/3, steps at epochs 8 and 11, gradient
# norm of the whole model clipped at 35, single scale 800. Epochs -> iterations: the YAML config.
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2norm.engine.solver import clip_full_model_gradients
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
resnet50_fpn(model, norm="FrozenBN", fpn_norm="CBN", freeze_at=2)
four_conv_one_fc_heads(model, norm="CBN")

dataloader = coco_dataloader(min_size_train=(800,), total_batch_size=16)

SGD.params.weight_decay_norm = 1e-4  # mmdetection decays every parameter, norm affine included
optimizer = L(clip_full_model_gradients)(optimizer=SGD, max_norm=35.0, norm_type=2.0)
lr_multiplier = multi_step_lr(steps=(58633, 80620), max_iter=87949, warmup_iters=500, warmup_factor=1 / 3)
train = train_options(
    max_iter=87949,
    output_dir="output/CBN/mask_rcnn_R_50_FPN_1x_cbn",
    init_checkpoint="detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    reference_world_size=8,
)

d2norm = get_d2norm_config()
d2norm.CBN.WINDOW = 8
d2norm.CBN.BURNIN_ITERS = 21987  # 3 epochs
d2norm.PRECISE_BN.ENABLED = False  # the paper evaluates with the layers' EMA statistics
