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
- **backward statistics** (Yan et al. 2020, the motivation of MABN): per channel, the statistics a
  layer's backward uses, ``g = mean ∂L/∂ẑ`` and ``ψ = mean ẑ·∂L/∂ẑ`` over (N, H, W) (ẑ the
  normalised input before γ, β) — the batch's for BN and CBN (this process's batch, also for the
  synchronised layers), the moving average of ψ (and no g) for MABN
  (:meth:`~d2norm.layers.NormLayer.backward_statistics`). Over the last
  ``backward_window`` observed iterations: ``backward_psi`` / ``backward_g``, their RMS, and
  ``backward_psi_spread`` / ``backward_g_spread``, their sample standard deviation across those
  iterations, each averaged over channels (in the units of ∂L/∂ẑ: compare layers and runs at the
  same loss and loss scale). At small batch the batch's ψ is noisy; MABN's moving average is not.
- **recalibration**: how far each recalibration moved the population statistics
  (:func:`normalization_gap` of new vs old), written by :class:`d2norm.engine.hooks.NormRecalibrator`.

Keys: ``norm/<part>/<metric>`` (mean over the layers of a part: ``backbone``, ``fpn``, ``heads``,
``other``) and ``norm_layer/<module path>/<metric>`` for the inconsistency and the backward
statistics. The monitor only reads: training is
identical with it on or off.
"""
import contextlib
from collections import defaultdict, deque

import torch
import torch.nn as nn
from detectron2.engine.train_loop import HookBase

from ..layers import norm_layer
from .population import normalization_gap
from .recalibration import population_norm_layers

__all__ = [
    "BackwardStatistics",
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


class BackwardStatistics:
    """Per layer, the backward statistics of the last ``window`` observed iterations and their
    RMS and standard deviation across iterations (see the module docstring)."""

    def __init__(self, window=10):
        if window < 2:
            raise ValueError(f"a spread across iterations needs a window of at least 2, got {window}")
        self._history = defaultdict(lambda: defaultdict(lambda: deque(maxlen=window)))

    def add(self, name, statistics):
        """``statistics``: ``{"g": (C,) or None, "psi": (C,) or None}`` of one iteration."""
        for key, value in statistics.items():
            if value is not None:
                self._history[name][key].append(value.detach().double().cpu())

    def summaries(self):
        """``{layer: {"backward_psi": RMS, "backward_psi_spread": spread, ...}}``, spreads only over
        2 or more iterations."""
        out = defaultdict(dict)
        for name, statistics in self._history.items():
            for key, values in statistics.items():
                stacked = torch.stack(list(values))  # (iterations, C)
                rms = stacked.square().mean(dim=0).sqrt()
                out[name][f"backward_{key}"] = rms.mean().item()
                if len(values) > 1:
                    out[name][f"backward_{key}_spread"] = stacked.std(dim=0).mean().item()
        return out


def _batch_backward_statistics(output, grad_output, layer):
    """The batch's g = mean ∂L/∂ẑ and ψ = mean ẑ·∂L/∂ẑ per channel, from the layer's output y and
    its gradient: with y = γ·ẑ + β, ∂L/∂ẑ = γ·∂L/∂y and ẑ·∂L/∂ẑ = (y − β)·∂L/∂y."""
    dims = [d for d in range(output.dim()) if d != 1]
    dtype = torch.promote_types(output.dtype, torch.float32)
    gy, y = grad_output.to(dtype), output.to(dtype)
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    centred = y if bias is None else y - bias.detach().to(dtype).view(1, -1, *[1] * (y.dim() - 2))
    g = gy.mean(dim=dims)
    if weight is not None:
        g = g * weight.detach().to(dtype)
    return g, (gy * centred).mean(dim=dims)


class NormStatsProbe:
    """Measures the layers of ``model`` during the forwards (and their backwards) run between
    :meth:`start` and :meth:`summaries`.

    ``summaries()`` then returns the scalars of the last observation (each layer's values averaged
    over its calls, then over the layers of each part), and the backward statistics over the last
    ``backward_window`` observations.
    """

    def __init__(self, model, backward_window=10):
        self.layers = population_norm_layers(model)
        self._values = defaultdict(lambda: defaultdict(list))  # layer name -> metric -> values
        self._batch_backward = defaultdict(list)  # layer name -> [(g, ψ) per call] of this observation
        self.backward = BackwardStatistics(backward_window)
        self._handles = []

    def start(self):
        """Measure the following forwards (forgetting any earlier observation)."""
        self.stop()
        self._values.clear()
        self._batch_backward.clear()
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(
                lambda m, args, name=name: self._before_forward(name, m, args[0])))
            self._handles.append(layer.register_forward_hook(
                lambda m, args, out, name=name: self._after_forward(name, m, args[0], out)))

    @property
    def observing(self):
        return bool(self._handles)

    def stop(self):
        """Stop measuring forwards (backwards of the forwards measured still are); :meth:`summaries`
        keeps the values measured since :meth:`start`."""
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

    def _measured(self, module, x):
        # Recalibration and other no-grad forwards are not training iterations and are not measured.
        return torch.is_grad_enabled() and norm_layer(module).trains_statistics(x)

    def _before_forward(self, name, module, x):
        if not self._measured(module, x):
            return
        layer = norm_layer(module)
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

    def _after_forward(self, name, module, x, output):
        if not (isinstance(output, torch.Tensor) and output.requires_grad and self._measured(module, x)):
            return
        kept = output.detach()

        def measure(grad):
            with torch.no_grad():
                self._batch_backward[name].append(_batch_backward_statistics(kept, grad, module))

        output.register_hook(measure)

    def _record_backward(self):
        """After the backward: each observed layer's backward statistics into the history."""
        layers = dict(self.layers)
        for name, calls in self._batch_backward.items():
            g, psi = (torch.stack(v).mean(dim=0) for v in zip(*calls))
            used_g, used_psi = norm_layer(layers[name]).backward_statistics(g, psi)
            self.backward.add(name, {"g": used_g, "psi": used_psi})
        self._batch_backward.clear()

    def summaries(self):
        """``{key: float}``: per-layer inconsistency and backward statistics, per-part means of
        every metric. Call it after the observed iteration's backward."""
        self._record_backward()
        scalars, per_part = {}, defaultdict(lambda: defaultdict(list))
        per_layer = defaultdict(dict)
        for name, metrics in self._values.items():
            for metric, values in metrics.items():
                per_layer[name][metric] = sum(float(v) for v in values) / len(values)
        observed = {name for name in self._values}
        for name, metrics in self.backward.summaries().items():
            if name in observed:
                per_layer[name].update(metrics)
        for name, metrics in per_layer.items():
            for metric, value in metrics.items():
                per_part[model_part(name)][metric].append(value)
                if metric == "inconsistency" or metric.startswith("backward_"):
                    scalars[f"norm_layer/{name}/{metric}"] = value
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
