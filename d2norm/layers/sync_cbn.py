"""SyncCBN: CBN whose per-iteration statistics are those of every process of a group together.

CBN (Yao et al., CVPR 2021) keeps per-process statistics, as its paper does. With statistics
synchronised, R processes of b images each train as one process of R·b images: the batch mean and
variance (two all-reduces: the sum, then the centred sum of squares), the derivatives of both with
respect to the conv weight that the window stores for its Taylor compensation (CBN Eq. 6-7; the
sums Σ_m p_m and Σ_m x(m) p_m over the output positions), and the backward's batch sums
Σ g and Σ g·x̂ are all-reduced with their counts, so uneven batches, and a process without values,
weigh correctly. Burn-in is SyncBN. Users ask the official CBN for exactly this (issue #5).

Every process must run the same training forwards and backwards (collectives per layer per
direction), as for ``torch.nn.SyncBatchNorm``; a process whose batch is empty still calls the
layer and backpropagates through its (empty) output. Forwards without autograd in training mode
(recalibration) normalise with the process's own batch, as CBN's do.
"""
import torch
from torch.nn.grad import conv2d_weight

from .cbn import CrossIterationBatchNorm2d, input_patch_sum, statistic_gradients_from_sums
from .per_channel import REDUCE_DIMS, per_channel
from .process_group import sum_over_group

__all__ = ["SyncCrossIterationBatchNorm2d"]


class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    """:class:`~d2norm.layers.cbn.CrossIterationBatchNorm2d` with statistics over ``process_group``.

    Args:
        process_group: the ``torch.distributed`` group to reduce over (None: the default group).
            Without an initialised process group the layer is CBN over this process alone, unless
            the environment says the job has several processes (``WORLD_SIZE`` > 1): an error.
        other arguments: as :class:`~d2norm.layers.cbn.CrossIterationBatchNorm2d`.
    """

    kind = "SyncCBN"
    synchronized = True

    def __init__(self, num_features, window=8, burnin_iters=0, rho=1.0, momentum=0.1, eps=1e-5, affine=True,
                 process_group=None):
        super().__init__(num_features, window, burnin_iters, rho, momentum, eps, affine)
        self.process_group = process_group

    def _sum(self, *tensors):
        return sum_over_group(list(tensors), self.process_group, self)

    def _batch_statistics(self, xs):
        count = torch.tensor(float(xs.numel() // xs.shape[1]), dtype=xs.dtype, device=xs.device)
        total, count = self._sum(xs.sum(dim=REDUCE_DIMS), count)
        mean = total / count
        (centred,) = self._sum((xs - per_channel(mean)).square().sum(dim=REDUCE_DIMS))
        return mean, centred / count, count

    def _statistic_gradients(self, conv, conv_input, conv_output, mean):
        patch_sum, count = input_patch_sum(conv_input, conv.weight.shape[2:], conv.stride, conv.padding, conv.dilation)
        weight_grad_sum = conv2d_weight(conv_input, conv.weight.shape, conv_output, conv.stride, conv.padding,
                                        conv.dilation, conv.groups)
        count = torch.tensor(float(count), dtype=mean.dtype, device=mean.device)
        patch_sum, weight_grad_sum, count = self._sum(patch_sum, weight_grad_sum, count)
        return statistic_gradients_from_sums(patch_sum, weight_grad_sum, count, mean, conv.groups)

    def _backward_reduction(self):
        return self._sum

    def extra_repr(self):
        return super().extra_repr() + ("" if self.process_group is None else ", process_group=custom")
