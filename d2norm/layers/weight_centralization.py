"""Weight centralisation for the convs that feed MABN (MABN paper, Sec. 4.3; official ``CenConv2d``
in megvii-model/MABN).

MABN normalises by the second moment and never subtracts a mean; instead every conv that feeds it
uses a zero-mean filter per output channel, W̃[c] = W[c] − mean_{i,u,v} W[c, i, u, v], recomputed in
each forward with autograd through the subtraction (so ∂L/∂W[c] is the projection of ∂L/∂W̃[c]
onto the zero-mean subspace).

A transposed conv (``nn.ConvTranspose2d``, e.g. the up-sampling of ViTDet's
``SimpleFeaturePyramid``) stores its weight as (C_in, C_out / groups, kh, kw): output channel c of
group g is computed from the input channels of g and taps (u, v), and its mean over the output
positions of a constant input is proportional to Σ_{i,u,v} W[i, c, u, v]. Centring over exactly
those entries gives the same zero-mean filter property, so MABN can follow a transposed conv too.

:func:`centralize_conv_weight` swaps a conv's class to a cached subclass whose ``forward`` sees
W̃ as ``self.weight``. This works for ``torch.nn.Conv2d`` and for detectron2's ``Conv2d`` (whose
``forward`` calls ``F.conv2d`` itself and then applies its ``norm``/``activation``). Outside
``forward`` the attribute ``weight`` is still the trainable Parameter under its own name, so
checkpoints (centred or not) load unchanged, initialisers act on the Parameter, and
``isinstance`` checks against the original class still hold. The subclass, not forward hooks,
carries the centring because ``torch.compile`` guards on a module's class but not on its hooks
(dynamo's ``skip_nnmodule_hook_guards``): a graph compiled for a plain conv would be reused for a
centralised one. ``torch.nn.utils.parametrize`` works the same way (a cached subclass per class)
but renames the weight Parameter and its checkpoint key. Nor can a new, centralised conv be put in
the old one's place: models keep convs in places no module registry reaches, e.g. detectron2's
``FPN`` runs its ``lateral_convs`` / ``output_convs`` from plain Python lists, so the forward would
still call the old, uncentralised object; the class of the one object every reference points to
is what has to change.
"""

import torch
import torch.nn as nn

__all__ = [
    "centralize_conv_weight", "centralized_weight", "effective_conv_weight", "is_weight_centralized",
    "remove_weight_centralization",
]

_CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def centralized_weight(weight: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """W − mean W over the entries of each output channel; differentiable.

    For a conv (``transposed=False``, weight (C_out, C_in / groups, kh, kw)) that is every
    dimension but the first; for a transposed conv (weight (C_in, C_out / groups, kh, kw)) the
    group's input channels and the taps of each output channel.
    """
    if not transposed:
        return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)
    c_in, c_out_per_group = weight.shape[:2]
    grouped = weight.reshape(groups, c_in // groups, c_out_per_group, *weight.shape[2:])
    dims = (1, *range(3, grouped.dim()))
    return (grouped - grouped.mean(dim=dims, keepdim=True)).reshape(weight.shape)


def _centralized_weight_of(conv, weight):
    return centralized_weight(weight, isinstance(conv, nn.ConvTranspose2d), conv.groups)


class _WeightCentralizedConv:
    """Mixin placed in front of a conv class: its forward computes with the centred weight."""

    def forward(self, *args, **kwargs):
        # An instance attribute shadows ``_parameters["weight"]`` (nn.Module resolves parameters
        # only when normal attribute lookup fails), so the base forward reads W̃ while the
        # Parameter itself, parameters() and state_dict() are untouched.
        self.__dict__["weight"] = _centralized_weight_of(self, self._parameters["weight"])
        try:
            return super().forward(*args, **kwargs)
        finally:
            del self.__dict__["weight"]

    def extra_repr(self):
        return super().extra_repr() + ", weight_centralized=True"

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time, so pickle (torch.save of a whole model) refers to
        # the original class and re-derives the subclass when loading.
        return _new_centralized, (type(self)._centralized_base,), self.__dict__


_CENTRALIZED_CLASSES: dict[type, type[nn.Module]] = {}


def _centralized_class(base: type) -> type[nn.Module]:
    cls = _CENTRALIZED_CLASSES.get(base)
    if cls is None:
        name = f"WeightCentralized{base.__name__}"
        cls = type(name, (_WeightCentralizedConv, base), {"__module__": __name__, "_centralized_base": base})
        _CENTRALIZED_CLASSES[base] = cls
    return cls


def _new_centralized(base: type) -> nn.Module:
    """Unpickling helper: an uninitialised instance of the centralised subclass of ``base``."""
    cls = _centralized_class(base)
    return cls.__new__(cls)


def is_weight_centralized(conv: nn.Module) -> bool:
    """Whether ``conv`` went through :func:`centralize_conv_weight`."""
    return isinstance(conv, _WeightCentralizedConv)


def centralize_conv_weight(conv: nn.Module) -> nn.Module:
    """Make ``conv`` use W − mean W per output channel in forward (in place, idempotent).

    Args:
        conv: a ``torch.nn.Conv2d`` or subclass (e.g. ``detectron2.layers.Conv2d``), or a
            ``torch.nn.ConvTranspose2d``.

    Returns:
        ``conv`` itself, now an instance of a subclass of its original class.
    """
    if not isinstance(conv, _CONV_TYPES):
        raise TypeError(
            f"centralize_conv_weight expects an nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}"
        )
    if not is_weight_centralized(conv):
        conv.__class__ = _centralized_class(type(conv))
    return conv


def remove_weight_centralization(conv: nn.Module) -> nn.Module:
    """Undo :func:`centralize_conv_weight` (back to the original class: the forward uses
    ``conv.weight`` as it is, e.g. once W̃ is folded into it). Returns ``conv``."""
    if is_weight_centralized(conv):
        conv.__class__ = type(conv)._centralized_base
    return conv


def effective_conv_weight(conv: nn.Module) -> torch.Tensor:
    """The weight ``conv``'s forward multiplies by: W̃ if centralised, else W (for folding)."""
    if is_weight_centralized(conv):
        return _centralized_weight_of(conv, conv.weight)
    return conv.weight
