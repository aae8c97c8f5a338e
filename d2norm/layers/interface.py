"""What every d2norm normalization layer answers, and the same interface for torch's BatchNorm.

Recalibration, the statistics monitor, the inference-regime iteration, conv binding, folding and
the optimizer's norm groups talk to a layer only through :class:`NormLayer`. A new norm type
implements it (one module in ``d2norm/layers/``) and registers a name; no consumer changes.
:func:`norm_layer` gives torch's own ``nn.BatchNorm*``/``nn.SyncBatchNorm`` (whose layers a d2norm
model also recalibrates and monitors) the same interface, so those consumers switch on no class.

Statistics conventions: a layer normalises as ``(x - mean) / sqrt(var + eps)`` before its affine;
a layer that does not centre (MABN) has ``mean = None`` and ``var`` its second moment.
"""
import abc
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .per_channel import batch_norm_affine, statistics_dtype

__all__ = ["BatchNormStatistics", "NormLayer", "TrainingStatistics", "norm_layer"]


@dataclass
class TrainingStatistics:
    """The statistics a training forward normalises with, and what else the layer reports about it.

    ``mean`` (C,) or None (no centring), ``var`` (C,): the forward computes
    ``(x - mean) / sqrt(var + eps)`` before γ, β (for MABN, ``var`` includes its renorm factor r).
    ``metrics``: per-kind scalars for the monitor (``{"cbn_valid_fraction": ...}``), floats or
    0-dim tensors.
    """

    mean: torch.Tensor | None
    var: torch.Tensor
    metrics: dict = field(default_factory=dict)


class NormLayer(abc.ABC):
    """The interface of a d2norm normalization layer (a mixin listed before its torch base class).

    Class attributes:
        kind (str): the name the layer is registered under (``"CBN"``, ``"MABN"``, ``"PreciseBN"``).
        conv_binding (str or None): what :func:`d2norm.prepare_model` does with the conv that feeds
            the layer: ``"bind"`` (the layer needs its weight and input, CBN), ``"centralize"``
            (weight centralisation, MABN) or None.
        needs_recalibration (bool): population statistics come only from recalibration (PreciseBN).

    A layer also has ``num_features`` and ``eps``, and a ``_version`` with migrations in
    ``_load_from_state_dict`` when its state layout changes (torch's convention).
    """

    kind: str = ""
    conv_binding: str | None = None
    needs_recalibration: bool = False

    def estimates_population(self) -> bool:
        """Whether the layer has population statistics to estimate (False: frozen, like FrozenBN)."""
        return True

    def has_population_statistics(self) -> bool:
        """Whether :meth:`population_statistics` may be used for inference yet."""
        return True

    @abc.abstractmethod
    def population_statistics(self):
        """``(mean or None, var)``, copies of the statistics the layer normalises with in eval mode."""

    @abc.abstractmethod
    def set_population_statistics(self, mean, second_moment):
        """Set the population statistics from the pooled per-channel ``E[x]`` and ``E[x²]`` of the
        layer's inputs (Rethinking-BN, Appendix), as recalibration computes them."""

    @abc.abstractmethod
    def per_channel_affine(self):
        """``(scale, shift)`` with eval output ``scale[c] * x + shift[c]`` (what folding uses); may be
        differentiable in γ, β."""

    @abc.abstractmethod
    def trains_statistics(self, x) -> bool:
        """Whether a forward on ``x`` (in the current grad mode) is a training step of the layer's
        statistics, i.e. normalises with training statistics."""

    @abc.abstractmethod
    def training_statistics(self, x) -> TrainingStatistics:
        """The statistics the next training forward on ``x`` will normalise with; changes no state."""

    def backward_statistics(self, g, psi):
        """``(g, ψ)`` that the layer's last backward used, given the batch's per-channel
        ``g = mean ∂L/∂ẑ`` and ``ψ = mean ẑ·∂L/∂ẑ`` over (N, H, W), ẑ the normalised input before
        γ, β (the backward statistics of Yan et al. 2020, MABN; BN's input gradient is
        ``(∂L/∂ẑ − g − ẑ·ψ)/σ``). Each is (C,), or None where the backward has no such term.
        Called after the backward; a layer whose backward differentiates through its batch
        statistics (BN, PreciseBN, BRN, CBN's current-batch term) used the batch's."""
        return g, psi

    def freeze_statistics(self, frozen: bool):
        """Called by :func:`d2norm.prepare_model` with whether all the layer's parameters are frozen
        (a frozen stage, ``FREEZE_AT``): a layer with no FrozenBatchNorm2d counterpart then uses
        its population statistics like one. BatchNorm subclasses need nothing: detectron2 converts
        them to FrozenBatchNorm2d when it freezes a stage."""
        return None

    def cross_iteration_buffers(self) -> dict:
        """``{name: buffer}`` of the state carried from one training iteration to the next (windows,
        ring buffers), beyond the population statistics; empty for a per-batch layer."""
        return {}

    def in_warmup(self) -> bool:
        """Whether the next training forward still runs a start-up phase (CBN before its window has
        an entry, MABN warm-up or renorm-free iterations) rather than the steady-state algorithm."""
        return False

    def skip_warmup(self):
        """Advance the layer's schedule past burn-in / warm-up, so the next training forward runs
        the steady-state algorithm (benchmarks and tests); a layer without a schedule has none."""
        return None

    @contextlib.contextmanager
    def placeholder_statistics(self):
        """Within the block, eval forwards run even before population statistics exist (their
        output is then meaningless: for observing the data flow only)."""
        yield


class BatchNormStatistics(NormLayer):
    """:class:`NormLayer` for layers holding BatchNorm's ``running_mean``/``running_var``, which
    normalise a training batch with its own mean and biased variance."""

    def estimates_population(self):
        return self.running_mean is not None

    def population_statistics(self):
        return self.running_mean.detach().clone(), self.running_var.detach().clone()

    @torch.no_grad()
    def set_population_statistics(self, mean, second_moment):
        self.running_mean.copy_(mean)
        self.running_var.copy_((second_moment - mean.square()).clamp_(min=0))

    def per_channel_affine(self):
        return batch_norm_affine(self)

    def trains_statistics(self, x):
        return self.training and x.numel() > 0

    @torch.no_grad()
    def training_statistics(self, x):
        xs = x.detach().to(statistics_dtype(x))
        var, mean = torch.var_mean(xs, dim=[d for d in range(xs.dim()) if d != 1], correction=0)
        return TrainingStatistics(mean, var)


class _TorchBatchNorm(BatchNormStatistics):
    """The interface of a torch ``_BatchNorm`` (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, ...), by delegation."""

    def __init__(self, module):
        self.__dict__["module"] = module

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    @property
    def kind(self):
        return type(self.module).__name__


def norm_layer(module: nn.Module) -> NormLayer | None:
    """The :class:`NormLayer` interface of ``module``: a d2norm layer itself, a view of a torch
    BatchNorm (any ``_BatchNorm`` subclass), or None for anything else (FrozenBN, GN, LN, ...)."""
    if isinstance(module, NormLayer):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _TorchBatchNorm(module)
    return None

