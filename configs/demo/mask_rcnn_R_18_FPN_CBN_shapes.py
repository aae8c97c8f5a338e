# LazyConfig twin of mask_rcnn_R_18_FPN_CBN_shapes.yaml: the demo (mask_rcnn_R_18_FPN_MABN_shapes.py)
# with CBN (window 4, 100 burn-in iterations) in the FPN, the box head and the mask head, as in the
# CBN paper. Train it with
#   python tools/lazyconfig_train_net.py --config-file configs/demo/mask_rcnn_R_18_FPN_CBN_shapes.py
from .mask_rcnn_R_18_FPN_MABN_shapes import d2norm, dataloader, lr_multiplier, model, optimizer, train

model.backbone.norm = "CBN"
model.roi_heads.box_head.conv_norm = "CBN"
model.roi_heads.mask_head.conv_norm = "CBN"
d2norm.CBN.WINDOW = 4
d2norm.CBN.BURNIN_ITERS = 100

__all__ = ["dataloader", "d2norm", "lr_multiplier", "model", "optimizer", "train"]
