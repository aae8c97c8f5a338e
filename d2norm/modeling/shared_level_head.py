"""A RetinaNet head whose BatchNorm layers normalise all FPN levels together ("shared training").

"Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021), Sec. 5.2 and Table 5: the RetinaNet head
runs the same towers on every FPN level. detectron2 normalises each level on its own in training
(``CycleBatchNormList`` for "BN"/"SyncBN"; d2norm's ``PerLevelNorm`` for its layers); the paper's
other training option normalises the positions of all levels as one batch. This head does that
for every ``torch.nn`` BatchNorm in its towers (``norm`` given as a class, e.g.
``torch.nn.SyncBatchNorm``: the strings "BN"/"SyncBN" make detectron2 build per-level lists).
"""

import torch
import torch.nn as nn
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

__all__ = ["SharedTrainingRetinaNetHead"]


def _apply_jointly(features: list[torch.Tensor], layers):
    """Run ``layers`` on every level; BatchNorm layers see the levels' positions concatenated."""
    for layer in layers:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            sizes = [f.shape[2] * f.shape[3] for f in features]
            joint = torch.cat([f.flatten(2) for f in features], dim=2).unsqueeze(3)
            parts = layer(joint).squeeze(3).split(sizes, dim=2)
            features = [part.reshape(f.shape) for part, f in zip(parts, features)]
        else:
            features = [layer(f) for f in features]
    return features


class SharedTrainingRetinaNetHead(RetinaNetHead):
    """:class:`RetinaNetHead` with one set of batch statistics over all FPN levels per tower norm."""

    def forward(self, features: list[torch.Tensor]):
        assert len(features) == self._num_features
        logits = _apply_jointly(features, [*self.cls_subnet, self.cls_score])
        bbox_reg = _apply_jointly(features, [*self.bbox_subnet, self.bbox_pred])
        return logits, bbox_reg
