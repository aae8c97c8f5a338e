"""Optimizer construction that treats d2norm layers as normalization layers.

Detectron2 applies ``SOLVER.WEIGHT_DECAY_NORM`` only to parameters owned by a fixed tuple of torch
norm types (``detectron2/solver/build.py``, ``get_default_optimizer_params``). CBN and PreciseBN
subclass ``nn.BatchNorm2d`` and are covered; MABN and the per-level wrapper (shared affine) are not,
so they would silently get the full weight decay. This module builds the same parameter groups with
every :class:`d2norm.layers.NormLayer` and the per-level wrapper included.
"""
import torch
from detectron2.solver.build import maybe_add_gradient_clipping

from ..layers import NormLayer
from ..layers.per_level import PerLevelNorm

__all__ = ["NORM_MODULE_TYPES", "build_optimizer", "clip_full_model_gradients", "get_optimizer_param_groups"]

NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    NormLayer,
    PerLevelNorm,
)


def get_optimizer_param_groups(model, base_lr=None, weight_decay=None, weight_decay_norm=None,
                               bias_lr_factor=1.0, weight_decay_bias=None):
    """One group per parameter, with detectron2's rules: norm-owned parameters get
    ``weight_decay_norm``; parameters named ``bias`` get ``base_lr * bias_lr_factor`` and
    ``weight_decay_bias`` (default: ``weight_decay``). Frozen and duplicate parameters are skipped.

    A value left ``None`` is left out of the groups, so the optimizer's own default applies (as
    ``detectron2.solver.get_default_optimizer_params`` does, for ``LazyCall(torch.optim.SGD)(params=
    LazyCall(get_optimizer_param_groups)(weight_decay_norm=0.0), lr=..., weight_decay=...)``)."""
    if weight_decay_bias is None:
        weight_decay_bias = weight_decay
    groups, seen = [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr, wd = base_lr, weight_decay
            if isinstance(module, NORM_MODULE_TYPES):
                wd = weight_decay_norm
            if name == "bias":
                lr = None if base_lr is None else base_lr * bias_lr_factor
                wd = weight_decay_bias
            group = {"params": [param]}
            if lr is not None:
                group["lr"] = lr
            if wd is not None:
                group["weight_decay"] = wd
            groups.append(group)
    return groups


def clip_full_model_gradients(optimizer, max_norm, norm_type=2.0):
    """Make ``optimizer`` clip the norm of all its gradients together before each step (a step
    pre-hook; returns it): ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` for LazyConfig, as
    ``LazyCall(clip_full_model_gradients)(optimizer=LazyCall(torch.optim.SGD)(...), max_norm=35.0)``."""

    def clip(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    optimizer.register_step_pre_hook(clip)
    return optimizer


def build_optimizer(cfg, model):
    """SGD (momentum, nesterov) over :func:`get_optimizer_param_groups`, with ``SOLVER.CLIP_GRADIENTS``.

    Besides detectron2's per-parameter clip types ``"value"`` and ``"norm"``, ``CLIP_TYPE:
    "full_model"`` clips the norm of all gradients together (mmdetection's ``grad_clip``, used by
    the official CBN configs).
    """
    groups = get_optimizer_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    sgd = torch.optim.SGD if full_model else maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    optimizer = sgd(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    return clip_full_model_gradients(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE) if full_model else optimizer
