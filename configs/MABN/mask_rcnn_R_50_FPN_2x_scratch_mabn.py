# LazyConfig twin of mask_rcnn_R_50_FPN_2x_scratch_mabn.yaml: Mask R-CNN R-50-FPN from scratch with
# MABN in the backbone, the FPN, a 4conv1fc box head and the mask head (recipe: base_mabn_scratch.py).
from detectron2.model_zoo import get_config

from ..common.d2norm_recipe import coco_dataloader, four_conv_one_fc_heads, resnet50_fpn, train_options
from .base_mabn_scratch import d2norm, lr_multiplier, optimizer

model = get_config("common/models/mask_rcnn_fpn.py").model
resnet50_fpn(model, norm="MABN", fpn_norm="MABN", freeze_at=0)
four_conv_one_fc_heads(model, norm="MABN")

dataloader = coco_dataloader(min_size_train=(800,), total_batch_size=16)
train = train_options(max_iter=180000, output_dir="output/MABN/mask_rcnn_R_50_FPN_2x_scratch_mabn",
                      reference_world_size=8)
