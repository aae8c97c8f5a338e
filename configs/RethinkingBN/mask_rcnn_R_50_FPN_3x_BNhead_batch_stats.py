# Sec. 4.1, Table 3: evaluate a mask_rcnn_R_50_FPN_3x_BNhead_ema.py checkpoint with mini-batch
# statistics in the heads at inference (each image's RoIs normalised with their own statistics),
# which removes the train/test inconsistency of small normalization batches. Training is identical,
# so this config is for evaluation:
#   tools/lazyconfig_train_net.py --config-file <this> --eval-only train.init_checkpoint=<ema model>
from d2norm.layers.batch_statistics import BatchStatisticsBatchNorm2d

from .mask_rcnn_R_50_FPN_3x_BNhead_ema import d2norm, dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = BatchStatisticsBatchNorm2d
train.output_dir = "output/RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_batch_stats"
