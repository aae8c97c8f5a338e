"""The "Rethinking 'Batch' in BatchNorm" variants: evaluation with batch statistics (Sec. 4.1),
RetinaNet head BatchNorm over all FPN levels together (Sec. 5.2), and Table 5's rows 3 and 4
(training per level with one shared population, or one per level)."""
from pathlib import Path

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


def _table5_head(config):
    """The RetinaNet head of a Table 5 YAML config, at a width that builds quickly."""
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.modeling.build import build_model

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "RethinkingBN" / config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "16",
                         "MODEL.RETINANET.NUM_CLASSES", "3"])
    torch.manual_seed(0)
    return build_model(cfg).head.double()


def _reset_to_cumulative(head):
    """Every head BN forgets its statistics and averages all it sees next with equal weight."""
    for m in head.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None


def test_table5_rows_3_and_4_train_alike_and_differ_only_in_shared_vs_per_level_population():
    """Row 3: one BN per head position called once per level (training statistics per level, one
    population); row 4 evaluates the same weights with one population per level (Sec. 5.2)."""
    row3 = _table5_head("retinanet_R_50_FPN_3x_SyncBNhead_shared_population.yaml")
    row4 = _table5_head("retinanet_R_50_FPN_3x_SyncBNhead_shared_population_eval_per_level.yaml")
    levels = 5
    shared = [m for m in row3.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    per_level = [m for m in row4.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(shared) == 8 and len(per_level) == 8 * levels  # 2 towers x 4 convs (x 5 levels)
    # Row 4 loads row 3's checkpoint: every weight and the shared affine; row 3's single
    # running statistics have no place (per-level statistics are recalibrated instead).
    missing, unexpected = row4.load_state_dict(row3.state_dict(), strict=False)
    assert missing and all(k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")
                           for k in missing + unexpected)

    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 16, s, s, generator=generator, dtype=torch.float64) * (1 + i) + i
                for i, s in enumerate((16, 8, 4, 2, 1))]  # each level its own distribution
    first3, first4 = row3.cls_subnet[1], row4.cls_subnet[1]  # the first norm of the cls tower
    outputs = {}
    for name, norm in (("row3", first3), ("row4", first4)):
        norm.register_forward_hook(lambda m, args, out, name=name: outputs.setdefault(name, []).append(out.detach()))
    for head in (row3, row4):
        _reset_to_cumulative(head)
        head.train()
    train3, train4 = row3(features), row4(features)
    for a, b in zip([*train3[0], *train3[1], *outputs["row3"]], [*train4[0], *train4[1], *outputs["row4"]]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # training statistics per level in both

    level_means = [row3.cls_subnet[0](f).mean(dim=(0, 2, 3)) for f in features]
    torch.testing.assert_close(first3.running_mean, torch.stack(level_means).mean(dim=0))  # one population
    for level, norm in enumerate(first4):  # ... against one per level
        torch.testing.assert_close(norm.running_mean, level_means[level])

    trained = {name: list(out) for name, out in outputs.items()}
    outputs.clear()
    for head in (row3, row4):
        head.eval()(features)
    # Per-level population statistics of this very batch reproduce the training normalisation (up
    # to the unbiased running variance, n/(n-1) for the 512 positions of level 0); shared ones do not.
    torch.testing.assert_close(outputs["row4"][0], trained["row4"][0], rtol=1e-2, atol=1e-2)
    assert (outputs["row3"][0] - trained["row3"][0]).abs().mean() > 0.5
