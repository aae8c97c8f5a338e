# As mask_rcnn_R_50_FPN_3x_BNhead_ema.py with SyncBN in the heads (statistics over the 16 images of
# all GPUs instead of 2), as projects/Rethinking-BatchNorm/configs/mask_rcnn_SyncBNhead.py.
from .mask_rcnn_R_50_FPN_3x_BNhead_ema import d2norm, dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "SyncBN"
train.output_dir = "output/RethinkingBN/mask_rcnn_R_50_FPN_3x_SyncBNhead"
