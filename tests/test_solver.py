"""Optimizer groups: every d2norm layer counts as a norm for SOLVER.WEIGHT_DECAY_NORM."""
import pytest
import torch.nn as nn
from detectron2.config import get_cfg
from detectron2.layers import Conv2d

from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.engine.solver import build_optimizer, get_optimizer_param_groups
from d2norm.layers.per_level import PerLevelNorm


def model_with_every_norm():
    return nn.Sequential(
        Conv2d(3, 4, 3, bias=False, norm=CrossIterationBatchNorm2d(4)),
        Conv2d(4, 4, 3, bias=False, norm=MovingAverageBatchNorm2d(4)),
        Conv2d(4, 4, 3, bias=False, norm=PreciseBatchNorm2d(4)),
        nn.Conv2d(4, 4, 3),
        PerLevelNorm.from_layer(MovingAverageBatchNorm2d(4), num_levels=2),
    )


def hyperparams_by_name(model, groups):
    by_param = {id(g["params"][0]): g for g in groups}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_norm_weights_of_all_d2norm_types_get_weight_decay_norm():
    model = model_with_every_norm()
    groups = get_optimizer_param_groups(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0,
                                        bias_lr_factor=2.0, weight_decay_bias=0.0)
    hp = hyperparams_by_name(model, groups)
    for name in ("0.norm.weight", "1.norm.weight", "2.norm.weight", "4.weight"):
        assert hp[name]["weight_decay"] == 0.0, name
        assert hp[name]["lr"] == 0.1
    for name in ("0.weight", "1.weight", "3.weight"):
        assert hp[name]["weight_decay"] == 1e-4, name
    for name in ("0.norm.bias", "1.norm.bias", "3.bias", "4.bias"):
        assert (hp[name]["lr"], hp[name]["weight_decay"]) == (0.2, 0.0), name


def test_mabn_paper_recipe_decays_gamma_like_every_weight():
    """MABN's maskrcnn-benchmark recipe: wd 1e-4 on gamma too (WEIGHT_DECAY_NORM 1e-4)."""
    model = model_with_every_norm()
    groups = get_optimizer_param_groups(model, 0.02, 1e-4, 1e-4)
    assert hyperparams_by_name(model, groups)["1.norm.weight"]["weight_decay"] == 1e-4


def test_build_optimizer_skips_frozen_parameters_and_applies_clipping():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.BASE_LR", "0.02"])
    model = model_with_every_norm()
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(cfg, model)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not model[0].weight for p in params)
    assert len(params) == sum(1 for p in model.parameters() if p.requires_grad)
    assert "Clip" in type(opt).__name__


@pytest.mark.parametrize("config", ["yaml", "lazy"])
def test_full_model_clipping_bounds_the_norm_of_all_gradients_together(config):
    """CLIP_TYPE "full_model" (mmdetection's grad_clip, official CBN configs): one joint norm, not per
    parameter; for LazyConfig, ``clip_full_model_gradients`` around a plain SGD (its class unchanged)."""
    import torch

    from d2norm.engine.solver import clip_full_model_gradients

    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0", "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0",
                         "SOLVER.WEIGHT_DECAY", "0.0"])
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 1, bias=False))
    before = [p.detach().clone() for p in model.parameters()]
    if config == "yaml":
        opt = build_optimizer(cfg, model)
    else:
        opt = clip_full_model_gradients(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=1.0)
        assert type(opt) is torch.optim.SGD
    grads = [torch.full_like(p, 3.0) for p in model.parameters()]  # joint norm sqrt(12 * 9) > 1
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    joint = torch.sqrt(sum((s ** 2).sum() for s in steps))
    torch.testing.assert_close(joint, torch.tensor(1.0))
    scale = steps[0].flatten()[0] / 3.0
    for s in steps:  # every parameter scaled by the same factor
        torch.testing.assert_close(s, torch.full_like(s, 3.0) * scale)
