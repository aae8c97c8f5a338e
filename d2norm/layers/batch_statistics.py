"""BatchNorm that normalises with the batch's own statistics at inference too.

"Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021), Sec. 4.1: with small normalization batches
(the RoIs of one image in an R-CNN head) the population statistics used at inference differ from
the mini-batch statistics the model was trained with; evaluating with mini-batch statistics removes
that train/test inconsistency. Training is exactly ``nn.BatchNorm2d``'s, so a BN checkpoint loads
and evaluates unchanged apart from the statistics.
"""
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BatchStatisticsBatchNorm2d"]


class BatchStatisticsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose eval mode also uses the statistics of the input batch (N, H, W)."""

    def forward(self, x):
        if self.training or x.numel() == 0:  # an empty batch (no RoI) has no statistics
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
