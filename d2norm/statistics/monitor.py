"""Norm statistics monitor: what the normalization layers do during training, as EventStorage scalars.

Every ``period`` iterations :class:`NormStatsMonitor` watches one training forward of every norm
layer that estimates population statistics and writes (``metrics.json``, TensorBoard):

- **train/test inconsistency** ("Rethinking 'Batch' in BatchNorm", Wu & Johnson 2021, Sec. 4): a
  layer normalises with training statistics (μ_t, σ²_t) — the batch's (BN, PreciseBN, CBN in
  burn-in), the pooled window (CBN Eq. 8-9), MABN's renormalised moving average (Yan et al. 2020) —
  and at inference with population statistics (μ_p, σ²_p). Before γ, β, the inference output is
  ``s·y + δ`` of the training output y, with ``s = √(σ²_t+ε)/√(σ²_p+ε)`` and
  ``δ = (μ_t - μ_p)/√(σ²_p+ε)``; :func:`normalization_gap` is the RMS difference of the two for a
  unit-variance y, ``√(δ² + (s - 1)²)``, averaged over channels (0: no inconsistency). MABN does
  not centre (δ = 0) and its ``s`` includes the renorm factor r.
- **CBN** (Yao et al. 2021): fraction of the stored past entries that are pooled (the rest have a
  negative compensated variance), size of the Taylor compensation (Eq. 6-7) relative to the
  statistic (|Δμ|/σ_old and |Δσ²|/σ²_old), and whether burn-in is over.
- **MABN** (Yan et al. 2020): fraction of channels whose renorm factor is clipped to
  [1/r_max, r_max], the ratio of the forward statistic (SMAS, or the batch χ in warm-up) to the
  EMAS, and whether warm-up and renormalisation have started.
- **recalibration**: how far each recalibration moved the population statistics
  (:func:`normalization_gap` of new vs old), written by :class:`d2norm.engine.hooks.NormRecalibrator`.

Keys: ``norm/<part>/<metric>`` (mean over the layers of a part: ``backbone``, ``fpn``, ``heads``,
``other``) and ``norm_layer/<module path>/inconsistency``. The monitor only reads: training is
identical with it on or off.
"""
import contextlib
from collections import defaultdict

import torch
import torch.nn as nn
from detectron2.engine.train_loop import HookBase

from ..layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from ..layers.cbn import pooled_statistics
from ..layers.per_channel import statistics_dtype
from .population import has_population_statistics, normalization_gap
from .recalibration import population_norm_layers

__all__ = [
    "NormStatsMonitor",
    "NormStatsProbe",
    "model_part",
    "recalibration_shift",
]

# Module path prefixes of the model parts, first match wins (detectron2 meta-architectures).
_PARTS = (
    ("backbone.bottom_up.", "backbone"),
    ("backbone.", "fpn"),
    ("roi_heads.", "heads"),
    ("proposal_generator.", "heads"),
    ("head.", "heads"),
    ("sem_seg_head.", "heads"),
)


def model_part(name):
    """``"backbone"``, ``"fpn"``, ``"heads"`` or ``"other"`` for a module path of a detectron2 model."""
    return next((part for prefix, part in _PARTS if name.startswith(prefix)), "other")


def recalibration_shift(before, after):
    """``norm/<part>/recalibration_shift``: per part, the mean over layers of
    :func:`normalization_gap` between the statistics ``after`` and ``before`` a recalibration
    (both from :func:`population_statistics`)."""
    per_part = defaultdict(list)
    for name, (mean, var, eps) in after.items():
        if name in before:
            old_mean, old_var, _ = before[name]
            gap = normalization_gap(mean, var.double(), old_mean, old_var.double(), eps)
            per_part[model_part(name)].append(gap.mean().item())
    return {f"norm/{part}/recalibration_shift": sum(v) / len(v) for part, v in per_part.items()}


def _reduce_dims(x):
    return [d for d in range(x.dim()) if d != 1]


def _updates_statistics(layer, x):
    """Whether this forward is a training forward with training statistics (as the layers decide)."""
    # Recalibration and other no-grad forwards are not training iterations and are not measured.
    return (layer.training and torch.is_grad_enabled() and x.numel() > 0 and not getattr(layer, "frozen", False)
            and (not isinstance(layer, (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d)) or x.requires_grad))


class NormStatsProbe:
    """Measures the layers of ``model`` during the forwards run inside :meth:`observe`.

    ``summaries()`` then returns the scalars of the last observation (each layer's values averaged
    over its calls, then over the layers of each part).
    """

    def __init__(self, model):
        self.layers = population_norm_layers(model)
        self._values = defaultdict(lambda: defaultdict(list))  # layer name -> metric -> values
        self._mabn_before = {}
        self._handles = []

    def start(self):
        """Measure the following forwards (forgetting any earlier observation)."""
        self.stop()
        self._values.clear()
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(
                lambda m, args, name=name: self._before_forward(name, m, args[0])))
            if isinstance(layer, MovingAverageBatchNorm2d):
                self._handles.append(layer.register_forward_hook(
                    lambda m, args, out, name=name: self._after_mabn_forward(name, m, args[0])))

    @property
    def observing(self):
        return bool(self._handles)

    def stop(self):
        """Stop measuring; :meth:`summaries` keeps the values measured since :meth:`start`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def observe(self):
        """``with probe.observe(): model(batch)``: :meth:`start`, then :meth:`stop`."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _record(self, name, metric, value):
        self._values[name][metric].append(value)  # a float or a 0-dim tensor, read in summaries()

    def _before_forward(self, name, layer, x):
        if not _updates_statistics(layer, x):  # needs the grad mode of the forward: not under no_grad
            return
        with torch.no_grad():
            self._measure(name, layer, x)

    def _measure(self, name, layer, x):
        if isinstance(layer, MovingAverageBatchNorm2d):
            self._mabn_before[name] = layer.running_var.clone()
            return
        xs = x.detach().to(statistics_dtype(x))
        var, mean = torch.var_mean(xs, dim=_reduce_dims(xs), correction=0)
        if isinstance(layer, CrossIterationBatchNorm2d):
            mean, var = self._cbn_statistics(name, layer, mean, var)
        if has_population_statistics(layer):
            gap = normalization_gap(mean, var, layer.running_mean.to(mean.dtype),
                                    layer.running_var.to(var.dtype), layer.eps)
            self._record(name, "inconsistency", gap.mean())

    def _cbn_statistics(self, name, layer, mean, var):
        """The statistics this CBN forward normalises with, and its window metrics."""
        pools = layer.pools_window()
        self._record(name, "cbn_pooling", float(pools))
        window = layer.compensated_window() if pools else None
        if window is None:
            return mean, var
        past_mean, past_var, past_valid = window
        filled = int(layer.history_length)
        if filled > 0:
            stored_mean = layer.history_mean[:filled].to(mean.dtype)
            stored_var = layer.history_var[:filled].to(var.dtype)
            self._record(name, "cbn_valid_fraction", past_valid[:filled].float().mean())
            std = torch.sqrt(stored_var + layer.eps)
            self._record(name, "cbn_mean_compensation", ((past_mean[:filled] - stored_mean).abs() / std).mean())
            self._record(name, "cbn_var_compensation",
                         ((past_var[:filled] - stored_var).abs() / (stored_var + layer.eps)).mean())
        pooled_mean, pooled_var, _ = pooled_statistics(mean, var, past_mean, past_var, past_valid)
        return pooled_mean, pooled_var

    @torch.no_grad()
    def _after_mabn_forward(self, name, layer, x):
        running_var = self._mabn_before.pop(name, None)
        if running_var is None:
            return
        use_smas, renormalize = (bool(flag) for flag in layer.schedule(layer.iters))
        buffer = layer.buffer_x2
        var = buffer.mean(dim=0) if use_smas else buffer[int(layer.iters) % layer.buffer_size]
        ratio = torch.sqrt(var + layer.eps) / torch.sqrt(running_var + layer.eps)
        clipped = (ratio < 1.0 / layer.rmax) | (ratio > layer.rmax)
        r = ratio.clamp(1.0 / layer.rmax, layer.rmax) if renormalize else torch.ones_like(ratio)
        # Training divides x by √(var+ε)/r, inference by √(running_var+ε): s = ratio / r, δ = 0.
        self._record(name, "inconsistency", (ratio / r - 1).abs().mean())
        self._record(name, "mabn_clip_rate", clipped.float().mean() if renormalize else 0.0)
        self._record(name, "mabn_smas_emas_ratio", (var / running_var.clamp(min=layer.eps)).mean())
        self._record(name, "mabn_warmed_up", float(use_smas))
        self._record(name, "mabn_renorm", float(renormalize))

    def summaries(self):
        """``{key: float}``: per-layer inconsistency and per-part means of every metric."""
        scalars, per_part = {}, defaultdict(lambda: defaultdict(list))
        for name, metrics in self._values.items():
            for metric, values in metrics.items():
                value = sum(float(v) for v in values) / len(values)
                per_part[model_part(name)][metric].append(value)
                if metric == "inconsistency":
                    scalars[f"norm_layer/{name}/inconsistency"] = value
        for part, metrics in per_part.items():
            for metric, values in metrics.items():
                scalars[f"norm/{part}/{metric}"] = sum(values) / len(values)
        return scalars


class NormStatsMonitor(HookBase):
    """Write :class:`NormStatsProbe` summaries to the EventStorage every ``period`` iterations.

    Observes the iterations whose ``iter + 1`` is a multiple of ``period`` (those detectron2's
    writers write, with their default period 20) and the last one.
    """

    def __init__(self, model, period):
        if period < 1:
            raise ValueError(f"D2NORM.MONITOR.PERIOD must be >= 1, got {period}")
        self.probe = NormStatsProbe(model.module if isinstance(model, nn.parallel.DistributedDataParallel)
                                    else model)
        self.period = period

    def before_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self.period == 0 or next_iter == self.trainer.max_iter:
            self.probe.start()

    def after_step(self):
        if not self.probe.observing:
            return
        self.probe.stop()
        scalars = self.probe.summaries()
        if scalars:
            self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)
