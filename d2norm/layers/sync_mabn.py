"""SyncMABN: MABN whose batch statistics are those of every process of a group together.

MABN (Yan et al., ICLR 2020) keeps per-process statistics, as its paper does. With statistics
synchronised, R processes of b images each train as one process of R·b images: the forward
statistic χ = mean(x²) (and hence its moving averages, the renorm factor r and the population
EMA) and the backward statistic Ψ = mean(g·z) are means over the values of all processes, each
all-reduced as (sum, count) so that uneven batches, and a process with no values at all, weigh
correctly. The users of the official CBN and mmcv ask for synchronised variants (official CBN
issue #5, mmcv #2074).

Every process must run the same training forwards and backwards (a collective per layer per
direction), as for ``torch.nn.SyncBatchNorm``; a process whose batch is empty still calls the layer
and must backpropagate through its (empty) output.
"""
import torch

from .mabn import MovingAverageBatchNorm2d
from .per_channel import REDUCE_DIMS, statistics_dtype
from .process_group import sum_over_group

__all__ = ["SyncMovingAverageBatchNorm2d"]


class SyncMovingAverageBatchNorm2d(MovingAverageBatchNorm2d):
    """:class:`~d2norm.layers.mabn.MovingAverageBatchNorm2d` with statistics over ``process_group``.

    Args:
        process_group: the ``torch.distributed`` group to reduce over (None: the default group).
            Without an initialised process group the layer is MABN over this process alone, unless
            the environment says the job has several processes (``WORLD_SIZE`` > 1), which is an
            error: the statistics would silently differ from the configured ones.
        other arguments: as :class:`~d2norm.layers.mabn.MovingAverageBatchNorm2d`.
    """

    kind = "SyncMABN"
    synchronized = True

    def __init__(self, num_features, buffer_size=16, warmup_iters=100, renorm_free_iters=1000, rmax=5.0,
                 ema_decay=0.98, eps=1e-5, affine=True, process_group=None):
        super().__init__(num_features, buffer_size, warmup_iters, renorm_free_iters, rmax, ema_decay, eps, affine)
        self.process_group = process_group

    def _sum_over_group(self, sums, count):
        """``(sums, count)`` summed over the group in one all-reduce."""
        return tuple(sum_over_group([sums, count], self.process_group, self))

    def _batch_second_moment(self, x):
        xs = x.to(statistics_dtype(x))
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=xs.dtype, device=xs.device)
        sums, count = self._sum_over_group(xs.square().sum(dim=REDUCE_DIMS), count)
        return sums / count

    def _backward_reduction(self):
        return self._sum_over_group

    def extra_repr(self):
        return super().extra_repr() + ("" if self.process_group is None else ", process_group=custom")
