# Sec. 6, Table 6 / Figure 9: mask_rcnn_R_50_FPN_3x_BNhead_ema.py with the RoIs of all workers
# shuffled through the BN box and mask heads in training (detectron2's
# projects/Rethinking-BatchNorm/configs/mask_rcnn_BNhead_shuffle.py; d2norm.SHUFFLE_ROIS).
from .mask_rcnn_R_50_FPN_3x_BNhead_ema import d2norm, dataloader, lr_multiplier, model, optimizer, train

train.output_dir = "output/RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_shuffle"
d2norm.SHUFFLE_ROIS = True
