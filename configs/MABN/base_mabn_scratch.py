# Shared by the MABN LazyConfigs (twins of Base-MABN-RCNN-FPN.yaml / Base-MABN-RetinaNet.yaml):
# MABN (Yan et al., ICLR 2020) detection recipe of megvii-model/MABN (maskrcnn-benchmark): from
# scratch (FREEZE_AT 0), 2x = 180k iterations at 16 images (2 per GPU on 8 GPUs), steps 120k/160k,
# warm-up 500 from 1/3, weight decay 1e-4 on every weight (norm gamma included), biases 2x LR and
# no weight decay, single scale 800; MABN m = 16, EMA 0.98, warm-up 100, renorm-free 1000,
# r_max 5, CenConv before every MABN, batch statistics in the heads for 10k iterations (App. B.3).
from d2norm.lazy import get_d2norm_config

from ..common.d2norm_recipe import SGD, multi_step_lr

SGD.params.weight_decay_norm = 1e-4
SGD.params.bias_lr_factor = 2.0
SGD.params.weight_decay_bias = 0.0
optimizer = SGD
lr_multiplier = multi_step_lr(steps=(120000, 160000), max_iter=180000, warmup_iters=500, warmup_factor=1 / 3)

d2norm = get_d2norm_config()
d2norm.MABN.BUFFER_SIZE = 16
d2norm.MABN.EMA_DECAY = 0.98
d2norm.MABN.WARMUP_ITERS = 100
d2norm.MABN.RENORM_FREE_ITERS = 1000
d2norm.MABN.RMAX = 5.0
d2norm.MABN.CENTRALIZE_WEIGHTS = True
d2norm.MABN.HEAD_WARMUP_ITERS = 10000
d2norm.PRECISE_BN.ENABLED = False  # the paper evaluates with the layers' EMA statistics
