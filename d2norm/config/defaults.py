"""The ``D2NORM`` config node (defaults follow the papers) and its validation."""
from detectron2.config import CfgNode as CN

__all__ = ["add_d2norm_config", "validate_d2norm_config", "D2NormConfigError", "RECALIBRATION_REGIMES"]

# D2NORM.PRECISE_BN.REGIME: what the layers upstream of a layer normalise with while its population
# statistics are collected: batch statistics (training-mode forwards, as PreciseBN/fvcore/detectron2)
# or the population statistics themselves, iterated to a fixed point (d2norm.statistics.inference_regime).
RECALIBRATION_REGIMES = ("training", "inference")


class D2NormConfigError(ValueError):
    """A ``D2NORM`` value outside its allowed range; the message names the key."""


def add_d2norm_config(cfg):
    """Add the ``D2NORM`` node to a detectron2 config (call between ``get_cfg`` and ``merge``)."""
    cfg.D2NORM = CN()

    cfg.D2NORM.CBN = CN()
    # k: iterations pooled, the current one included (official code's buffer_num is k - 1).
    cfg.D2NORM.CBN.WINDOW = 8
    # Training iterations of plain BN before pooling starts (paper configs: 3 COCO epochs).
    cfg.D2NORM.CBN.BURNIN_ITERS = 0
    # ρ, weight of the Taylor compensation of past statistics; 0: "naive CBN" (no compensation).
    cfg.D2NORM.CBN.RHO = 1.0

    cfg.D2NORM.MABN = CN()
    # m: iterations in the simple moving averages of the forward and backward statistics.
    cfg.D2NORM.MABN.BUFFER_SIZE = 16
    # Iterations normalised with the current batch's statistics.
    cfg.D2NORM.MABN.WARMUP_ITERS = 100
    # Batch-statistics warm-up for MABN layers in the R-CNN/RetinaNet heads; -1: WARMUP_ITERS.
    cfg.D2NORM.MABN.HEAD_WARMUP_ITERS = -1
    # Iterations with the renorm factor r fixed to 1 (then clipped to [1/RMAX, RMAX]).
    cfg.D2NORM.MABN.RENORM_FREE_ITERS = 1000
    cfg.D2NORM.MABN.RMAX = 5.0
    # Weight of the old value in the EMA of the population statistic.
    cfg.D2NORM.MABN.EMA_DECAY = 0.98
    # Centralise (zero-mean per output channel) the weight of every conv that feeds an MABN.
    cfg.D2NORM.MABN.CENTRALIZE_WEIGHTS = True

    cfg.D2NORM.BRN = CN()
    # Batch Renormalization (Ioffe 2017): final clip bounds of r and d ...
    cfg.D2NORM.BRN.RMAX = 3.0
    cfg.D2NORM.BRN.DMAX = 5.0
    # ... plain BN for WARMUP_ITERS iterations, then linear ramps reaching RMAX / DMAX at these iterations.
    cfg.D2NORM.BRN.WARMUP_ITERS = 5000
    cfg.D2NORM.BRN.RMAX_ITERS = 40000
    cfg.D2NORM.BRN.DMAX_ITERS = 25000

    cfg.D2NORM.PRECISE_BN = CN()
    # Recalibrate population statistics before each evaluation and at the end of training.
    cfg.D2NORM.PRECISE_BN.ENABLED = True
    # Recalibration batches per rank.
    cfg.D2NORM.PRECISE_BN.NUM_ITER = 200
    # Also recalibrate every PERIOD iterations; 0: only before evaluation and at the end.
    cfg.D2NORM.PRECISE_BN.PERIOD = 0
    # Also recalibrate before an --eval-only evaluation (e.g. per-level statistics for a model
    # trained with shared ones, "Rethinking 'Batch'" Table 5).
    cfg.D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY = False

    # "training": upstream layers use batch statistics; "inference": population statistics (passes).
    cfg.D2NORM.PRECISE_BN.REGIME = "training"
    # "inference" regime: at most this many passes over the same NUM_ITER batches (0: number of
    # norm layers + 1, enough for the exact fixed point) ...
    cfg.D2NORM.PRECISE_BN.MAX_PASSES = 0
    # ... stopping after a pass that moves no layer's statistics by more than this (normalization gap).
    cfg.D2NORM.PRECISE_BN.TOLERANCE = 0.01

    cfg.D2NORM.MONITOR = CN()
    # Write norm statistics (train/test inconsistency, CBN/MABN state, recalibration shift) to metrics.
    cfg.D2NORM.MONITOR.ENABLED = False
    # Observe one training iteration every PERIOD iterations (and the last one).
    cfg.D2NORM.MONITOR.PERIOD = 20

    # Switch norm layers to population statistics (after a recalibration) for the last N iters.
    cfg.D2NORM.FREEZE_NORM_LAST_ITERS = 0

    # Shuffle the RoIs of all workers through the R-CNN box and mask heads in training, so that a
    # norm there sees RoIs of random images ("Rethinking 'Batch' in BatchNorm" Sec. 6, Table 6).
    cfg.D2NORM.SHUFFLE_ROIS = False


def _check(cond, key, value, allowed):
    if not cond:
        raise D2NormConfigError(f"cfg.{key} = {value!r} is invalid: allowed {allowed}")


def validate_d2norm_config(cfg):
    """Raise :class:`D2NormConfigError` naming the first ``D2NORM`` key with a bad value."""
    d = cfg.D2NORM

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    _check(is_int(d.CBN.WINDOW) and d.CBN.WINDOW >= 1, "D2NORM.CBN.WINDOW", d.CBN.WINDOW, "an integer >= 1")
    _check(isinstance(d.CBN.RHO, (int, float)) and not isinstance(d.CBN.RHO, bool) and d.CBN.RHO >= 0,
           "D2NORM.CBN.RHO", d.CBN.RHO, "a number >= 0 (1: CBN, 0: naive CBN)")
    for key in ("CBN.BURNIN_ITERS", "MABN.WARMUP_ITERS", "MABN.RENORM_FREE_ITERS", "BRN.WARMUP_ITERS",
                "BRN.RMAX_ITERS", "BRN.DMAX_ITERS",
                "PRECISE_BN.PERIOD", "FREEZE_NORM_LAST_ITERS"):
        node, value = d, None
        for part in key.split("."):
            value = node = node[part]
        _check(is_int(value) and value >= 0, f"D2NORM.{key}", value, "an integer >= 0")
    _check(is_int(d.MABN.BUFFER_SIZE) and d.MABN.BUFFER_SIZE >= 1,
           "D2NORM.MABN.BUFFER_SIZE", d.MABN.BUFFER_SIZE, "an integer >= 1")
    _check(is_int(d.MABN.HEAD_WARMUP_ITERS) and d.MABN.HEAD_WARMUP_ITERS >= -1,
           "D2NORM.MABN.HEAD_WARMUP_ITERS", d.MABN.HEAD_WARMUP_ITERS, "an integer >= 0, or -1")
    _check(isinstance(d.MABN.RMAX, (int, float)) and d.MABN.RMAX >= 1.0,
           "D2NORM.MABN.RMAX", d.MABN.RMAX, "a number >= 1")
    _check(isinstance(d.MABN.EMA_DECAY, (int, float)) and 0.0 <= d.MABN.EMA_DECAY < 1.0,
           "D2NORM.MABN.EMA_DECAY", d.MABN.EMA_DECAY, "a number in [0, 1)")
    _check(isinstance(d.BRN.RMAX, (int, float)) and d.BRN.RMAX >= 1.0, "D2NORM.BRN.RMAX", d.BRN.RMAX, "a number >= 1")
    _check(isinstance(d.BRN.DMAX, (int, float)) and d.BRN.DMAX >= 0.0, "D2NORM.BRN.DMAX", d.BRN.DMAX, "a number >= 0")
    _check(is_int(d.PRECISE_BN.NUM_ITER) and d.PRECISE_BN.NUM_ITER >= 1,
           "D2NORM.PRECISE_BN.NUM_ITER", d.PRECISE_BN.NUM_ITER, "an integer >= 1")
    _check(d.PRECISE_BN.REGIME in RECALIBRATION_REGIMES, "D2NORM.PRECISE_BN.REGIME", d.PRECISE_BN.REGIME,
           " or ".join(f'"{r}"' for r in RECALIBRATION_REGIMES))
    _check(is_int(d.PRECISE_BN.MAX_PASSES) and d.PRECISE_BN.MAX_PASSES >= 0,
           "D2NORM.PRECISE_BN.MAX_PASSES", d.PRECISE_BN.MAX_PASSES, "an integer >= 0 (0: automatic)")
    _check(isinstance(d.PRECISE_BN.TOLERANCE, (int, float)) and d.PRECISE_BN.TOLERANCE >= 0,
           "D2NORM.PRECISE_BN.TOLERANCE", d.PRECISE_BN.TOLERANCE, "a number >= 0")
    _check(is_int(d.MONITOR.PERIOD) and d.MONITOR.PERIOD >= 1, "D2NORM.MONITOR.PERIOD", d.MONITOR.PERIOD,
           "an integer >= 1")
    for key in ("MABN.CENTRALIZE_WEIGHTS", "PRECISE_BN.ENABLED", "PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY",
                "MONITOR.ENABLED"):
        family, name = key.split(".")
        value = d[family][name]
        _check(isinstance(value, bool), f"D2NORM.{key}", value, "true or false")
    _check(isinstance(d.SHUFFLE_ROIS, bool), "D2NORM.SHUFFLE_ROIS", d.SHUFFLE_ROIS, "true or false")


def cbn_settings(d2norm_cfg, in_head=False):
    """``CrossIterationBatchNorm2d`` keyword arguments from the ``D2NORM`` node (the same in the heads)."""
    d = d2norm_cfg.CBN
    return {"window": d.WINDOW, "burnin_iters": d.BURNIN_ITERS, "rho": float(d.RHO)}


def mabn_settings(d2norm_cfg, in_head=False):
    """``MovingAverageBatchNorm2d`` keyword arguments from the ``D2NORM`` node; in a detection head
    the warm-up is ``HEAD_WARMUP_ITERS`` unless that is -1 (MABN §5: batch statistics in the heads
    for the first 10k iterations)."""
    d = d2norm_cfg.MABN
    warmup = d.HEAD_WARMUP_ITERS if in_head and d.HEAD_WARMUP_ITERS >= 0 else d.WARMUP_ITERS
    return {
        "buffer_size": d.BUFFER_SIZE,
        "warmup_iters": warmup,
        "renorm_free_iters": d.RENORM_FREE_ITERS,
        "rmax": float(d.RMAX),
        "ema_decay": float(d.EMA_DECAY),
    }


def brn_settings(d2norm_cfg, in_head=False):
    """``BatchRenorm2d`` keyword arguments from the ``D2NORM`` node (the same in the heads)."""
    d = d2norm_cfg.BRN
    return {"rmax": float(d.RMAX), "dmax": float(d.DMAX), "warmup_iters": d.WARMUP_ITERS,
            "rmax_iters": d.RMAX_ITERS, "dmax_iters": d.DMAX_ITERS}


def scale_norm_iterations(cfg, num_workers):
    """Rescale ``D2NORM`` iteration counts as detectron2's ``auto_scale_workers`` rescales the schedule.

    With ``SOLVER.REFERENCE_WORLD_SIZE`` set, detectron2 keeps the per-GPU batch and divides
    ``MAX_ITER``/``STEPS``/warm-up by ``num_workers / REFERENCE_WORLD_SIZE``; burn-in and warm-up
    lengths measured in iterations must follow, or "3 epochs of burn-in" changes meaning. Window and
    buffer sizes stay (they count iterations of the per-GPU batch). Returns a new config.
    """
    ref = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if ref == 0 or ref == num_workers:
        return cfg
    scale = num_workers / ref
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    d = cfg.D2NORM
    d.CBN.BURNIN_ITERS = int(round(d.CBN.BURNIN_ITERS / scale))
    d.MABN.WARMUP_ITERS = int(round(d.MABN.WARMUP_ITERS / scale))
    d.MABN.RENORM_FREE_ITERS = int(round(d.MABN.RENORM_FREE_ITERS / scale))
    for key in ("WARMUP_ITERS", "RMAX_ITERS", "DMAX_ITERS"):
        d.BRN[key] = int(round(d.BRN[key] / scale))
    if d.MABN.HEAD_WARMUP_ITERS > 0:  # -1 inherits WARMUP_ITERS, rescaled above
        d.MABN.HEAD_WARMUP_ITERS = int(round(d.MABN.HEAD_WARMUP_ITERS / scale))
    d.FREEZE_NORM_LAST_ITERS = int(round(d.FREEZE_NORM_LAST_ITERS / scale))
    d.PRECISE_BN.PERIOD = int(round(d.PRECISE_BN.PERIOD / scale))
    if frozen:
        cfg.freeze()
    return cfg
