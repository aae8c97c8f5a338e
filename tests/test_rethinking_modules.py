"""The two "Rethinking 'Batch' in BatchNorm" variants the LazyConfigs use: evaluation with batch
statistics (Sec. 4.1) and RetinaNet head BatchNorm over all FPN levels together (Sec. 5.2)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from d2norm.layers.batch_statistics import BatchStatisticsBatchNorm2d
from d2norm.modeling.shared_level_head import SharedTrainingRetinaNetHead


def test_batch_statistics_bn_trains_as_bn_and_evaluates_with_the_batch_statistics():
    torch.manual_seed(0)
    layer, reference = BatchStatisticsBatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4) * 3 + 1
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    layer.eval()
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True, eps=layer.eps))
    assert layer(x[:0]).shape == (0, 3, 4, 4)  # no RoI: nothing to normalise


def test_shared_training_head_normalises_all_levels_as_one_batch():
    torch.manual_seed(0)
    head = SharedTrainingRetinaNetHead(input_shape=[ShapeSpec(channels=4)] * 3, num_classes=2, num_anchors=1,
                                       conv_dims=[4], norm=nn.BatchNorm2d)
    seen = []
    head.cls_subnet[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    features = [torch.randn(2, 4, s, s) for s in (4, 2, 1)]
    logits, _ = head(features)
    assert [t.shape[-2:] for t in logits] == [f.shape[-2:] for f in features]
    (joint,) = seen  # one call over the 2 x (16 + 4 + 1) positions of the three levels
    assert joint.shape == (2, 4, 21, 1)
    conv_out = [head.cls_subnet[0](f) for f in features]
    expected = torch.cat([c.flatten(2) for c in conv_out], dim=2).unsqueeze(3)
    torch.testing.assert_close(joint, expected)
