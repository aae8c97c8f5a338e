# Sec. 5.2, Table 5 row 4 (per-level training, per-level population statistics): evaluate a
# retinanet_R_50_FPN_3x_SyncBNhead_shared_population.py checkpoint with one set of statistics per
# FPN level (the standard head, "SyncBN" -> per-level lists sharing the trained affine),
# recalibrated on training data before evaluating (detectron2's retinanet-eval-domain-specific.py):
#   tools/lazyconfig_train_net.py --config-file <this> --eval-only train.init_checkpoint=<row-3 model>
from .retinanet_R_50_FPN_3x_SyncBNhead import d2norm, dataloader, lr_multiplier, model, optimizer, train

train.output_dir = "output/RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead_shared_population_eval_per_level"
d2norm.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY = True
