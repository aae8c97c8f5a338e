# Same training as mask_rcnn_R_50_FPN_3x_BNhead_ema.py (batch statistics in the heads), evaluated
# with population statistics recomputed on training data with the weights fixed (PreciseBN,
# Sec. 3): "PreciseBN" layers track no EMA; d2norm recalibrates them over 200 batches per GPU
# (3,200 images on 8 GPUs) before every evaluation and at the end of training.
from .mask_rcnn_R_50_FPN_3x_BNhead_ema import d2norm, dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "PreciseBN"
train.output_dir = "output/RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_precise"
d2norm.PRECISE_BN.ENABLED = True
d2norm.PRECISE_BN.NUM_ITER = 200
