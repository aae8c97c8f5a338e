"""Per-level normalization for heads shared across FPN levels ("Rethinking 'Batch'", Sec. 5.2).

Detectron2's ``RetinaNetHead`` runs the same ``cls_subnet``/``bbox_subnet`` once per FPN level. A
single norm layer there would normalise each level with that level's batch statistics in training
but keep *one* population estimate (and one cross-iteration history) for all levels — the
train/test inconsistency of the paper's Table 5. :class:`PerLevelNorm` holds one norm per level
(``affine=False``, own statistics and buffers) and one shared affine γ/β, and moves to the next
level's norm on every call, like detectron2's ``CycleBatchNormList`` but for any norm type.
"""
import inspect

import torch
import torch.nn as nn

from .interface import NormLayer
from .per_channel import per_channel, register_affine

__all__ = ["PerLevelNorm", "make_retinanet_head_per_level"]


class PerLevelNorm(nn.Module):
    """``num_levels`` affine-free norms, used in turn, followed by a shared per-channel affine.

    Call ``i`` (0-based, counted within a forward of the owning head) uses ``levels[i %
    num_levels]``; the head must call it a multiple of ``num_levels`` times per forward, which
    :func:`make_retinanet_head_per_level` checks.

    Args:
        make (callable): ``make(num_features, affine=False) -> nn.Module``, one call per level.
        num_features (int): number of channels C.
        num_levels (int): number of FPN levels.
        affine (bool): whether to hold the shared ``weight`` (γ) and ``bias`` (β).
    """

    def __init__(self, make, num_features, num_levels, affine=True):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_features = num_features
        self.levels = nn.ModuleList(make(num_features, affine=False) for _ in range(num_levels))
        register_affine(self, num_features, affine)
        self.position = 0

    @classmethod
    def from_layer(cls, layer, num_levels):
        """Per-level version of ``layer``: each level gets a copy of its settings and state.

        The constructor kwargs are read back from ``layer``'s attributes of the same names (the
        d2norm and torch layers store them that way); the shared affine starts at ``layer``'s γ/β.
        """
        kwargs = _constructor_kwargs(layer)
        per_level = cls(
            lambda c, affine: type(layer)(**{**kwargs, "num_features": c, "affine": affine}),
            layer.num_features,
            num_levels,
            affine=layer.weight is not None,
        )
        with torch.no_grad():
            if per_level.weight is not None:
                per_level.weight.copy_(layer.weight)
                per_level.bias.copy_(layer.bias)
            for norm in per_level.levels:
                _copy_buffers(layer, norm)
        return per_level.to(device=layer.running_var.device, dtype=layer.running_var.dtype)

    @property
    def num_levels(self):
        return len(self.levels)

    def per_level_layers(self):
        """The affine-free norm of each level, in call order."""
        return list(self.levels)

    def forward(self, x):
        y = self.levels[self.position](x)
        self.position = (self.position + 1) % self.num_levels
        if self.weight is None:
            return y
        return y * per_channel(self.weight.to(y.dtype)) + per_channel(self.bias.to(y.dtype))

    @torch.no_grad()
    def per_channel_affine(self, level):
        """``(scale, shift)`` of level ``level`` in eval mode: its norm's fold, then γ/β."""
        scale, shift = self.levels[level].per_channel_affine()
        if self.weight is None:
            return scale, shift
        return scale * self.weight, shift * self.weight + self.bias

    def extra_repr(self):
        return f"num_levels={self.num_levels}, affine={self.weight is not None}"


def _constructor_kwargs(layer):
    """Every constructor argument of ``layer`` except those :class:`PerLevelNorm` sets itself."""
    kwargs = {}
    for name, param in inspect.signature(type(layer).__init__).parameters.items():
        if name in ("self", "num_features", "affine", "device", "dtype") or param.kind not in (
            param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY
        ):
            continue
        if not hasattr(layer, name):
            raise TypeError(
                f"cannot build a per-level {type(layer).__name__}: it does not keep its "
                f"constructor argument {name!r} as an attribute"
            )
        kwargs[name] = getattr(layer, name)
    return kwargs


def _copy_buffers(src, dst):
    """Copy every buffer ``dst`` shares (by name and shape) with ``src``: statistics, counters."""
    src_buffers = dict(src.named_buffers())
    for name, buffer in dst.named_buffers():
        if name in src_buffers and src_buffers[name].shape == buffer.shape:
            buffer.copy_(src_buffers[name])


def make_retinanet_head_per_level(head, num_levels):
    """Replace each d2norm norm in ``head.cls_subnet``/``head.bbox_subnet`` by a :class:`PerLevelNorm`.

    ``head`` is detectron2's ``RetinaNetHead`` (or anything with those two ``nn.Sequential``
    towers run once per level); ``num_levels`` is its number of FPN levels. Also installs a check
    that every per-level norm of the head is called a multiple of ``num_levels`` times per
    forward. Idempotent. Returns the number of layers replaced.
    """
    replaced = 0
    for tower in (head.cls_subnet, head.bbox_subnet):
        for index, layer in enumerate(tower):
            if isinstance(layer, NormLayer):
                tower[index] = PerLevelNorm.from_layer(layer, num_levels)
                replaced += 1
    if replaced and not getattr(head, "_d2norm_per_level_check", False):
        head.register_forward_pre_hook(_restart_levels)
        head.register_forward_hook(_check_all_levels_called)
        head._d2norm_per_level_check = True
    return replaced


def _restart_levels(head, inputs):
    # A previous forward that raised part-way leaves positions behind; every forward starts at 0.
    for module in head.modules():
        if isinstance(module, PerLevelNorm):
            module.position = 0


def _check_all_levels_called(head, inputs, outputs):
    for name, module in head.named_modules():
        if isinstance(module, PerLevelNorm) and module.position != 0:
            raise RuntimeError(
                f"PerLevelNorm {name!r} was called a number of times that is not a multiple of "
                f"its {module.num_levels} levels in one forward of {type(head).__name__}: its "
                "levels no longer match the FPN levels."
            )
