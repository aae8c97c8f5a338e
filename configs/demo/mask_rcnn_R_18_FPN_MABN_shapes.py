# LazyConfig twin of mask_rcnn_R_18_FPN_MABN_shapes.yaml (the demo): the same model, data, solver and
# D2NORM settings, written as a Python config. Train it with
#   python tools/lazyconfig_train_net.py --config-file configs/demo/mask_rcnn_R_18_FPN_MABN_shapes.py
# ResNet-18-FPN Mask R-CNN from scratch on the built-in demo shapes split (128-pixel images, 2 per
# batch); MABN (the official detection settings) in the FPN, the box head and the mask head,
# GroupNorm in the backbone.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from omegaconf import OmegaConf

from d2norm.lazy import get_d2norm_config

from ..common.d2norm_recipe import SGD, multi_step_lr, train_options

model = get_config("common/models/mask_rcnn_fpn.py").model
model.pixel_std = [57.375, 57.12, 58.395]
# Backbone: ResNet-18 trained from scratch, GroupNorm (MODEL.RESNETS.NORM "GN").
model.backbone.bottom_up.stem.norm = "GN"
model.backbone.bottom_up.stages.depth = 18
model.backbone.bottom_up.stages.norm = "GN"
del model.backbone.bottom_up.stages.stride_in_1x1  # ResNet-18 blocks have no 1x1 conv
model.backbone.bottom_up.freeze_at = 0
# FPN with MABN, 64 channels.
model.backbone.out_channels = 64
model.backbone.norm = "MABN"
model.proposal_generator.head.in_channels = 64
# Three anchor sizes per octave, RPN positives at IoU 0.6 (Base-Demo-Shapes-easy.yaml explains why).
model.proposal_generator.anchor_generator.sizes = [
    [8, 10, 13], [16, 20, 25], [32, 40, 51], [64, 81, 102], [128, 161, 203]]
model.proposal_generator.head.num_anchors = 9
model.proposal_generator.anchor_matcher.thresholds = [0.3, 0.6]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (500, 250)
# Heads: 2conv1fc box head and 2-conv mask head with MABN, 64 channels, 5 classes.
model.roi_heads.num_classes = 5
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
model.roi_heads.box_head.conv_dims = [64, 64]
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_head.conv_norm = "MABN"
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.box_predictor.test_topk_per_image = 50
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [64, 64, 64]  # 2 convs, then the deconv's channels
model.roi_heads.mask_head.conv_norm = "MABN"

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="d2norm_shapes_demo_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=True,
    ),
    total_batch_size=2,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="d2norm_shapes_demo_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)],
        image_format="BGR",
    ),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
)

optimizer = SGD
lr_multiplier = multi_step_lr(steps=(1600, 1850), max_iter=2000, warmup_iters=100, warmup_factor=0.001)
train = train_options(max_iter=2000, output_dir="output/demo_lazy", checkpoint_period=500)
train.seed = 0

d2norm = get_d2norm_config()
d2norm.PRECISE_BN.NUM_ITER = 50
d2norm.MONITOR.ENABLED = True  # norm statistics in metrics.json (tools/plot_norm_stats.py plots them)
