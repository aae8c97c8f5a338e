# TEMPORARY placeholder, replaced by the layer implementation in this session.
import torch.nn as nn


class PreciseBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features, **kwargs):
        super().__init__(num_features)

    def forward(self, x):
        raise NotImplementedError("PreciseBatchNorm2d is being implemented")
