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

from ..layers import norm_layer
from .population import normalization_gap
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


class NormStatsProbe:
    """Measures the layers of ``model`` during the forwards run inside :meth:`observe`.

    ``summaries()`` then returns the scalars of the last observation (each layer's values averaged
    over its calls, then over the layers of each part).
    """

    def __init__(self, model):
        self.layers = population_norm_layers(model)
        self._values = defaultdict(lambda: defaultdict(list))  # layer name -> metric -> values
        self._handles = []

    def start(self):
        """Measure the following forwards (forgetting any earlier observation)."""
        self.stop()
        self._values.clear()
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(
                lambda m, args, name=name: self._before_forward(name, m, args[0])))

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

    def _before_forward(self, name, module, x):
        layer = norm_layer(module)
        # Recalibration and other no-grad forwards are not training iterations and are not measured.
        if not (torch.is_grad_enabled() and layer.trains_statistics(x)):
            return
        with torch.no_grad():
            statistics = layer.training_statistics(x)
            values = self._values[name]
            for metric, value in statistics.metrics.items():
                values[metric].append(value)  # a float or a 0-dim tensor, read in summaries()
            if layer.has_population_statistics():
                mean, var = layer.population_statistics()
                gap = normalization_gap(statistics.mean, statistics.var,
                                        None if mean is None else mean.to(statistics.var.dtype),
                                        var.to(statistics.var.dtype), layer.eps)
                values["inconsistency"].append(gap.mean())

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
