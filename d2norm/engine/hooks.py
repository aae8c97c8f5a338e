"""Training hooks for population statistics: PreciseBN recalibration and frozen norms at the end.

- :class:`RecalibrateNorms` replaces detectron2's ``hooks.PreciseBN``: it recalibrates every
  norm layer (all d2norm types, not only torch BN) when detectron2's ``EvalHook`` would evaluate,
  at the end of training and optionally every ``period`` iterations, with statistics identical on
  all ranks (:func:`d2norm.statistics.recalibration.recalibrate`).
- :class:`~d2norm.statistics.monitor.NormStatsMonitor` (``D2NORM.MONITOR``) writes what the norm layers do
  to the EventStorage.
- :class:`FreezeNormLastIters` trains the last N iterations with population statistics
  ("Rethinking 'Batch' in BatchNorm", Sec. 4.2: FrozenBN at the end of training removes the
  train/test inconsistency of small batches).

:func:`build_norm_hooks` builds both from ``cfg.D2NORM``; register them where detectron2 puts its
PreciseBN hook (before the checkpointer and the ``EvalHook``) and drop detectron2's own.
"""
import logging

from detectron2.engine.train_loop import HookBase
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

from ..config.defaults import RECALIBRATION_REGIMES
from ..layers import norm_layer
from ..statistics.inference_regime import recalibrate_in_inference_regime
from ..statistics.monitor import NormStatsMonitor, recalibration_shift
from ..statistics.population import population_statistics
from ..statistics.recalibration import population_norm_layers, recalibrate

__all__ = ["FreezeNormLastIters", "NormRecalibrator", "RecalibrateNorms", "build_norm_hooks", "norm_hooks",
           "recalibration_loader"]

logger = logging.getLogger(__name__)


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class NormRecalibrator:
    """``recalibrator()`` recalibrates ``model`` on the next ``num_iter`` batches of one loader.

    The loader is iterated once and kept, so successive recalibrations see fresh batches. A
    DDP-wrapped model is unwrapped: the forwards run under ``torch.no_grad``, and all-reduction of
    the statistics is done by :func:`~d2norm.statistics.recalibration.recalibrate` itself.

    ``regime`` is ``"training"`` (:func:`~d2norm.statistics.recalibration.recalibrate`) or ``"inference"``
    (:func:`~d2norm.statistics.inference_regime.recalibrate_in_inference_regime` with ``max_passes`` and
    ``tolerance``). With ``record_shift``, how far each recalibration moved the statistics goes to
    the current EventStorage (:func:`~d2norm.statistics.monitor.recalibration_shift`).
    """

    def __init__(self, model, data_loader, num_iter, regime="training", max_passes=0, tolerance=0.01,
                 record_shift=False):
        if regime not in RECALIBRATION_REGIMES:
            raise ValueError(f"D2NORM.PRECISE_BN.REGIME must be one of {RECALIBRATION_REGIMES}, got {regime!r}")
        self.model = _unwrap(model)
        self._data_loader = data_loader
        self._data_iter = None
        self.num_iter = num_iter
        self.regime, self.max_passes, self.tolerance = regime, max_passes, tolerance
        self.record_shift = record_shift

    def __call__(self):
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        before = population_statistics(self.model) if self.record_shift else None
        if self.regime == "inference":
            recalibrate_in_inference_regime(self.model, self._data_iter, self.num_iter,
                                            self.max_passes, self.tolerance)
        else:
            recalibrate(self.model, self._data_iter, self.num_iter)
        if before is not None:
            shift = recalibration_shift(before, population_statistics(self.model))
            if shift:
                get_event_storage().put_scalars(**shift, smoothing_hint=False)


class RecalibrateNorms(HookBase):
    """Recalibrate before each evaluation, at the end of training, and every ``period`` iterations.

    Runs in ``after_step`` when ``next_iter`` is ``max_iter``, a multiple of ``eval_period`` (when
    detectron2's ``EvalHook`` with the same period evaluates, provided this hook is registered
    before it), or a multiple of ``period``; a period of 0 disables that trigger.
    """

    def __init__(self, recalibrator, eval_period, period=0):
        self.recalibrator = recalibrator
        self._periods = [p for p in (eval_period, period) if p > 0]

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or any(next_iter % p == 0 for p in self._periods):
            self.recalibrator()


class FreezeNormLastIters(HookBase):
    """Train the last ``num_iters`` iterations with population statistics (frozen norm layers).

    At iteration ``max_iter - num_iters`` the norm layers are recalibrated and switched to eval
    mode (only they: detectron2's trainer asserts that the model is in training mode). They are
    put back in eval mode before every later step, because evaluation (``inference_context``)
    returns the whole model to training mode. After a resume past that iteration the statistics
    come from the checkpoint (saved after the switch) and are frozen again without recalibration.
    Recalibration skips frozen layers, so the statistics used in the last iterations are the ones
    evaluated.
    """

    def __init__(self, num_iters, model, recalibrator):
        self.num_iters = num_iters
        self._layers = [layer for _, layer in population_norm_layers(_unwrap(model))]
        self.recalibrator = recalibrator

    def before_step(self):
        switch_iter = max(self.trainer.max_iter - self.num_iters, 0)
        if self.trainer.iter < switch_iter:
            return
        if self.trainer.iter == switch_iter:
            logger.info(f"Freezing {len(self._layers)} normalization layers for the last "
                        f"{self.num_iters} iterations, after a recalibration.")
            self.recalibrator()
        for layer in self._layers:
            layer.eval()


def recalibration_loader(cfg, build_train_loader):
    """``build_train_loader(cfg)`` with ``DATALOADER.NUM_WORKERS = 0``, as detectron2 builds the
    loader of its PreciseBN hook; ``build_train_loader`` is e.g. ``Trainer.build_train_loader``."""
    loader_cfg = cfg.clone()
    loader_cfg.defrost()
    loader_cfg.DATALOADER.NUM_WORKERS = 0
    return build_train_loader(loader_cfg)


def build_norm_hooks(cfg, model, build_train_loader):
    """The d2norm hooks for ``cfg.D2NORM`` (possibly none), for ``Trainer.build_hooks``.

    Args:
        cfg: the full config (``D2NORM.PRECISE_BN.*``, ``D2NORM.FREEZE_NORM_LAST_ITERS``,
            ``D2NORM.MONITOR.*``, ``TEST.EVAL_PERIOD``).
        model: the (possibly DDP-wrapped) model being trained.
        build_train_loader (callable): ``cfg -> data loader``, see :func:`recalibration_loader`.
    """
    return norm_hooks(cfg.D2NORM, cfg.TEST.EVAL_PERIOD, model,
                      lambda: recalibration_loader(cfg, build_train_loader))


def norm_hooks(d2norm_cfg, eval_period, model, make_loader):
    """The d2norm hooks for the ``D2NORM`` node ``d2norm_cfg`` (YAML and LazyConfig trainers).

    Args:
        d2norm_cfg: ``PRECISE_BN.*``, ``FREEZE_NORM_LAST_ITERS`` and ``MONITOR.*``.
        eval_period (int): the evaluation period (recalibration runs before each evaluation).
        model: the (possibly DDP-wrapped) model being trained.
        make_loader (callable): ``() -> training data loader`` for recalibration, called once.

    The monitor (if enabled) comes first, so that it never observes a recalibration's forwards.
    """
    precise, freeze_iters, monitor = d2norm_cfg.PRECISE_BN, d2norm_cfg.FREEZE_NORM_LAST_ITERS, d2norm_cfg.MONITOR
    layers = population_norm_layers(_unwrap(model))
    if not precise.ENABLED and any(norm_layer(layer).needs_recalibration for _, layer in layers):
        logger.warning("D2NORM.PRECISE_BN.ENABLED is False but the model has PreciseBN layers: "
                       "they cannot be evaluated until d2norm.recalibrate is run.")
    hooks = [NormStatsMonitor(model, monitor.PERIOD)] if monitor.ENABLED and layers else []
    if not layers or not (precise.ENABLED or freeze_iters > 0):
        return hooks
    recalibrator = NormRecalibrator(
        model, make_loader(), precise.NUM_ITER, regime=precise.REGIME,
        max_passes=precise.MAX_PASSES, tolerance=precise.TOLERANCE, record_shift=monitor.ENABLED,
    )
    if precise.ENABLED:
        hooks.append(RecalibrateNorms(recalibrator, eval_period, precise.PERIOD))
    if freeze_iters > 0:
        hooks.append(FreezeNormLastIters(freeze_iters, model, recalibrator))
    return hooks
