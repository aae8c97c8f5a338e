# Building blocks shared by d2norm's LazyConfig (.py) configs: the optimizer whose parameter groups
# treat every d2norm layer as a norm, detectron2's YAML learning-rate schedule (multi-step with
# linear warm-up) and training options, each written so that a LazyConfig says what the YAML
# config beside it says (SOLVER.* keys in the comments).
import torch
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from d2norm.engine.solver import get_optimizer_param_groups

# SOLVER.BASE_LR, MOMENTUM, WEIGHT_DECAY, WEIGHT_DECAY_NORM (0.0: detectron2's default),
# BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS (None: WEIGHT_DECAY), NESTEROV False.
SGD = L(torch.optim.SGD)(
    params=L(get_optimizer_param_groups)(
        # params.model is set to the model by tools/lazyconfig_train_net.py
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        bias_lr_factor=1.0,
        weight_decay_bias=None,
    ),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
    nesterov=False,
)


def multi_step_lr(steps, max_iter, warmup_iters, warmup_factor, gamma=0.1):
    """SOLVER.STEPS / MAX_ITER / WARMUP_ITERS / WARMUP_FACTOR / GAMMA, WARMUP_METHOD "linear"."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**i for i in range(len(steps) + 1)],
            milestones=list(steps),
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


def train_options(max_iter, output_dir, init_checkpoint="", eval_period=0, checkpoint_period=5000,
                  reference_world_size=0):
    """detectron2's common ``train`` node; reference_world_size as SOLVER.REFERENCE_WORLD_SIZE."""
    train = get_config("common/train.py").train
    train.max_iter = max_iter
    train.output_dir = output_dir
    train.init_checkpoint = init_checkpoint
    train.eval_period = eval_period
    train.checkpointer.period = checkpoint_period
    train.reference_world_size = reference_world_size
    return train


def coco_dataloader(min_size_train=(800,), total_batch_size=16, use_instance_mask=True):
    """detectron2's COCO 2017 loaders (INPUT.MIN_SIZE_TRAIN, MAX_SIZE 1333, test at 800) with
    SOLVER.IMS_PER_BATCH = ``total_batch_size``."""
    dataloader = get_config("common/data/coco.py").dataloader
    dataloader.train.mapper.augmentations[0].short_edge_length = tuple(min_size_train)
    dataloader.train.mapper.use_instance_mask = use_instance_mask
    dataloader.train.total_batch_size = total_batch_size
    return dataloader


def resnet50_fpn(model, norm, fpn_norm, freeze_at, stride_in_1x1=True):
    """MODEL.RESNETS.NORM / DEPTH 50 / STRIDE_IN_1X1, MODEL.BACKBONE.FREEZE_AT and MODEL.FPN.NORM."""
    bottom_up = model.backbone.bottom_up
    bottom_up.stem.norm = bottom_up.stages.norm = norm
    bottom_up.stages.stride_in_1x1 = stride_in_1x1
    bottom_up.freeze_at = freeze_at
    model.backbone.norm = fpn_norm
    return model


def four_conv_one_fc_heads(model, norm):
    """MODEL.ROI_BOX_HEAD: FastRCNNConvFCHead, NUM_CONV 4, NUM_FC 1, NORM; MODEL.ROI_MASK_HEAD.NORM."""
    model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
    model.roi_heads.box_head.fc_dims = [1024]
    model.roi_heads.box_head.conv_norm = norm
    model.roi_heads.mask_head.conv_norm = norm
    return model
