# LazyConfig twin of retinanet_R_50_FPN_2x_scratch_mabn.yaml: RetinaNet R-50-FPN from scratch with
# MABN in the backbone, the FPN and the head, one set of MABN statistics per FPN level in the head
# (d2norm's PerLevelNorm), LR 0.01 (recipe: base_mabn_scratch.py).
from detectron2.model_zoo import get_config

from ..common.d2norm_recipe import coco_dataloader, resnet50_fpn, train_options
from .base_mabn_scratch import d2norm, lr_multiplier, optimizer

model = get_config("common/models/retinanet.py").model
resnet50_fpn(model, norm="MABN", fpn_norm="MABN", freeze_at=0)
model.head.norm = "MABN"
model.smooth_l1_beta = 0.0  # MODEL.RETINANET.SMOOTH_L1_LOSS_BETA of Base-RetinaNet.yaml

dataloader = coco_dataloader(min_size_train=(800,), total_batch_size=16, use_instance_mask=False)
optimizer.lr = 0.01
train = train_options(max_iter=180000, output_dir="output/MABN/retinanet_R_50_FPN_2x_scratch_mabn",
                      reference_world_size=8)
