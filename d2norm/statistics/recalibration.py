"""PreciseBN: recompute the population statistics of every normalization layer, model fixed.

"Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021), Sec. 3 and Appendix: run the fixed model
on ``num_iters`` training batches and pool the per-channel statistics of each norm layer's input
over all of them, weighting every batch by its number of values N·H·W,

    mean = Σ x / n,    E[x²] = Σ x² / n,    var = E[x²] - mean²   (population variance),

accumulated in float64. A batch whose input to a layer has a non-finite value adds nothing to
that layer's sums (the other batches still count); the number of such batches is logged. Under
``torch.distributed`` the sums and counts are all-reduced, so every rank ends with the statistics
of the union of all ranks' batches (fvcore's ``update_bn_stats`` keeps per-rank statistics:
detectron2 issues #5398, #5409).

What is set: each layer's :meth:`~d2norm.layers.NormLayer.set_population_statistics` from the
pooled E[x] and E[x²] (BatchNorm and its subclasses: ``running_mean`` and ``running_var``, a
PreciseBatchNorm2d is marked ``recalibrated``; MABN: ``running_var`` := E[x²], the second moment it
normalises by).

Which layers: a norm layer in eval mode while the model itself is in training mode is *frozen*
(e.g. by :class:`d2norm.engine.hooks.FreezeNormLastIters`) and keeps its statistics; it normalises with
them during the recalibration forwards, as in training. When the model as a whole is in eval mode,
every norm layer is recalibrated. Layers of frozen stages are never touched: detectron2's
``FrozenBatchNorm2d`` (not a BatchNorm subclass) and MABN layers marked ``frozen`` (its analogue,
set by :func:`d2norm.modeling.binding.prepare_model`); nor are layers with ``track_running_stats=False``.
"""
import itertools
import logging

import torch
import torch.distributed as dist
from detectron2.utils.events import EventStorage

from ..layers import norm_layer

__all__ = ["population_norm_layers", "recalibrate"]

logger = logging.getLogger(__name__)


def population_norm_layers(model):
    """``(name, layer)`` for every norm layer of ``model`` that estimates population statistics
    (:meth:`d2norm.layers.NormLayer.estimates_population`, torch BatchNorm included)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if (layer := norm_layer(module)) is not None and layer.estimates_population()
    ]


class _PooledMoments:
    """Per-channel Σx, Σx² and count n of one layer's inputs, in float64 (the paper's Appendix)."""

    def __init__(self, num_channels, device):
        self.sums = torch.zeros(2 * num_channels + 1, dtype=torch.float64, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # batches with non-finite values

    def add(self, x):
        num_channels = x.shape[1]
        x = x.detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.full((1,), x.numel() // num_channels, dtype=torch.float64, device=x.device)
        batch = torch.cat([x.sum(dim=dims), x.square().sum(dim=dims), count])
        finite = batch.isfinite().all()  # decided on the device: no synchronisation per layer
        self.sums += torch.where(finite, batch, 0.0)
        self.skipped += ~finite

    @property
    def count(self):
        return self.sums[-1]

    def mean_and_second_moment(self):
        num_channels = (self.sums.numel() - 1) // 2
        return self.sums[:num_channels] / self.count, self.sums[num_channels:-1] / self.count


@torch.no_grad()
def recalibrate(model, data_loader, num_iters, labels=True):
    """Set the population statistics of every norm layer of ``model`` from ``num_iters`` batches.

    Preconditions: with ``labels`` (PreciseBN), ``model(batch)`` accepts each batch in training
    mode, so a detectron2 model needs *training* batches with ground truth (its RPN and RoI heads
    sample proposals against the ``"instances"`` and compute losses): a loader from
    ``build_detection_train_loader(cfg)``, not ``build_detection_test_loader`` (a batch of dataset
    dicts without ``"instances"`` or ``"sem_seg"`` raises a ValueError). Without ``labels``
    (unlabeled images of a target domain, "Rethinking 'Batch' in BatchNorm" Sec. 5.1), the model
    runs as at inference (eval mode, no gradients: a detector's heads see its proposals and
    detections rather than sampled RoIs) with every norm layer recalibrated normalising with its
    batch's statistics. Every rank calls this with the same model and ``num_iters``. Parameters
    do not change. Afterwards every module has its former train/eval
    mode and every norm-layer buffer other than the statistics set here its former value (EMA
    statistics, cross-iteration windows, ring buffers, counters).

    Args:
        model (nn.Module): the model; detectron2 models run inside a throw-away ``EventStorage``.
        data_loader (iterable): yields at least ``num_iters`` batches; an iterator is advanced by
            exactly ``num_iters``.
        num_iters (int): batches per rank.
        labels (bool): whether the batches carry ground truth and the model runs in training mode.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    all_layers = population_norm_layers(model)
    # In a training model, a norm layer in eval mode is frozen: it keeps its statistics.
    layers = [(name, layer) for name, layer in all_layers if layer.training or not model.training]
    if not layers:
        logger.info("Recalibration: no normalization layer to recalibrate.")
        return
    logger.info(f"Recalibrating the population statistics of {len(layers)} normalization layers "
                f"over {num_iters} batches ...")
    modes = {module: module.training for module in model.modules()}
    saved = {layer: [b.clone() for b in layer.buffers()] for _, layer in all_layers}
    moments = {layer: _PooledMoments(layer.num_features, next(layer.buffers()).device) for _, layer in layers}
    try:
        if not labels:  # inference, except for the layers recalibrated: batch statistics
            model.eval()
            for _, layer in layers:
                layer.train()
        elif not model.training:  # an eval model is recalibrated as a whole, in training mode
            model.train()
        with torch.set_grad_enabled(labels and torch.is_grad_enabled()):
            _run(model, data_loader, num_iters, layers, moments, check_ground_truth=labels)
    finally:
        for module, mode in modes.items():
            module.training = mode
        for layer, buffers in saved.items():
            for buffer, value in zip(layer.buffers(), buffers):
                buffer.copy_(value)
    _all_reduce([m.sums for m in moments.values()])
    _set_statistics(layers, moments)


def _run(model, data_loader, num_iters, layers, moments, check_ground_truth):
    names = {layer: name for name, layer in layers}
    called = set()

    def accumulate(layer, inputs):
        if layer in called:
            raise RuntimeError(
                f"Normalization layer {names[layer]!r} was called more than once in one forward: "
                "a norm shared by several inputs (e.g. FPN levels) has no single population; give "
                "each input its own norm (d2norm.layers.per_level.PerLevelNorm)."
            )
        called.add(layer)
        moments[layer].add(inputs[0])

    handles = [layer.register_forward_pre_hook(accumulate) for _, layer in layers]
    log_every = max(1, num_iters // 5)
    done = 0
    try:
        with EventStorage():  # detectron2 models log in training mode; discard those events
            for batch in itertools.islice(data_loader, num_iters):
                if check_ground_truth:
                    _check_ground_truth(batch)
                called.clear()
                model(batch)
                done += 1
                if done % log_every == 0 or done == num_iters:
                    logger.info(f"Recalibration: {done}/{num_iters} batches.")
    finally:
        for handle in handles:
            handle.remove()
    if done != num_iters:
        raise RuntimeError(
            f"Recalibration needs {num_iters} batches but the data loader yielded only {done}."
        )


_GROUND_TRUTH_KEYS = ("instances", "sem_seg")  # what detectron2's training forwards read


def _check_ground_truth(batch):
    """Reject a detectron2 batch (a list of dataset dicts with an "image") that has no ground truth."""
    if not (isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict) and "image" in batch[0]):
        return
    if not any(key in batch[0] for key in _GROUND_TRUTH_KEYS):
        raise ValueError(
            "d2norm.recalibrate runs the model in training mode, which for a detectron2 model needs "
            f"ground truth, but the batch's dicts have only {sorted(batch[0])}: pass a training loader "
            "(detectron2.data.build_detection_train_loader(cfg)), not a test loader."
        )


def _all_reduce(tensors):
    """Sum ``tensors`` over all ranks in one collective (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _set_statistics(layers, moments):
    unseen = []
    skipped = {name: int(moments[layer].skipped) for name, layer in layers}
    if any(skipped.values()):
        logger.warning("Recalibration: batches with non-finite values were left out of: " + ", ".join(
            f"{name} ({n})" for name, n in skipped.items() if n))
    for name, layer in layers:
        pooled = moments[layer]
        if pooled.count == 0:
            unseen.append(name)
            continue
        norm_layer(layer).set_population_statistics(*pooled.mean_and_second_moment())
    if unseen:
        logger.warning(f"Recalibration: {len(unseen)} normalization layers received no input and "
                       f"keep their statistics: {', '.join(unseen)}")
