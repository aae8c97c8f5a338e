"""Report the training batches the d2norm layers left out of their state for non-finite values.

CBN and MABN skip the state update of a batch with a NaN/inf statistic and count it in their
``nonfinite_skips`` buffer without synchronising with the host. :class:`ReportNonFiniteSkips` reads
the counters every ``period`` iterations (one synchronisation), records their sum as the
``d2norm/nonfinite_skips`` scalar and logs a warning naming the layers whose count grew.
"""
import logging

import torch
from detectron2.engine.train_loop import HookBase
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ReportNonFiniteSkips"]

logger = logging.getLogger(__name__)


class ReportNonFiniteSkips(HookBase):
    """Every ``period`` iterations and at the end: log and record the layers' non-finite skips."""

    def __init__(self, model, period=20):
        model = model.module if isinstance(model, DistributedDataParallel) else model
        self._layers = [(name, m) for name, m in model.named_modules() if isinstance(
            getattr(m, "nonfinite_skips", None), torch.Tensor)]
        self._period = period
        self._reported = [0] * len(self._layers)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if not self._layers or (next_iter % self._period and next_iter != self.trainer.max_iter):
            return
        counts = torch.stack([layer.nonfinite_skips for _, layer in self._layers]).tolist()
        self.trainer.storage.put_scalar("d2norm/nonfinite_skips", sum(counts), smoothing_hint=False)
        grown = [f"{name} (+{new - old})" for (name, _), new, old in zip(self._layers, counts, self._reported)
                 if new > old]
        if grown:
            logger.warning(f"Iteration {next_iter}: batches with non-finite statistics left out of the "
                           f"state of {', '.join(grown)}")
        self._reported = counts
