# Sec. 5.2, Table 5 row 3 (per-level training, shared population statistics, the "straightforward"
# implementation): as retinanet_R_50_FPN_3x_SyncBNhead.py, but each head norm is one
# torch.nn.SyncBatchNorm called once per FPN level (a class, not the string "SyncBN", so detectron2
# builds no per-level list; this is what detectron2's projects/Rethinking-BatchNorm/configs/
# retinanet_SyncBNhead.py means with its `nn.SyncBatchNorm2d`). Each call normalises with its
# level's batch statistics and moves the one EMA, which is used for evaluation (no PreciseBN).
# The YAML twin uses "naiveSyncBN" instead (a YAML string cannot name a shared torch SyncBatchNorm).
from torch import nn

from .retinanet_R_50_FPN_3x_SyncBNhead import d2norm, dataloader, lr_multiplier, model, optimizer, train

model.head.norm = nn.SyncBatchNorm
train.output_dir = "output/RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead_shared_population"
d2norm.PRECISE_BN.ENABLED = False
