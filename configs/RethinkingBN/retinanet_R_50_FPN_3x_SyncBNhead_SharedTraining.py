# Sec. 5.2, Table 5 (shared training, shared population statistics): as
# retinanet_R_50_FPN_3x_SyncBNhead.py, but each head SyncBN normalises the positions of all five
# FPN levels together in training (d2norm.modeling.shared_level_head.SharedTrainingRetinaNetHead, with
# torch.nn.SyncBatchNorm: detectron2's project meant it but wrote `nn.SyncBatchNorm2d`), and its one
# set of population statistics is recalibrated over all levels together before evaluation.
from torch import nn

from d2norm.modeling.shared_level_head import SharedTrainingRetinaNetHead

from .retinanet_R_50_FPN_3x_SyncBNhead import d2norm, dataloader, lr_multiplier, model, optimizer, train

model.head._target_ = SharedTrainingRetinaNetHead
model.head.norm = nn.SyncBatchNorm
train.output_dir = "output/RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead_SharedTraining"
