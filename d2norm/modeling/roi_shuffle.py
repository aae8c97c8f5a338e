"""Shuffling RoI features across workers through a normalised R-CNN head ("Rethinking 'Batch' in
BatchNorm", Wu & Johnson 2021, Sec. 6, Table 6 / Figure 9).

With BN in the box or mask head, a worker's normalization batch holds the RoIs of its own 1-2
images, and the head can exploit that batch-level information (the paper's "information
leakage"). Shuffling the RoIs of all workers before the head and restoring their order after it
makes every worker normalise RoIs of random images, for any norm in the head. detectron2's
``projects/Rethinking-BatchNorm/configs/mask_rcnn_BNhead_shuffle.py`` is the anchor; here the
shuffle is a pair of hooks on the head's first and last module (state-dict keys, the head's class
and its code stay as they are), and the workers' RoI counts may differ.

Each training forward of a head, on R workers with n_r RoIs each (N in all): every worker gathers
all N RoI features (a differentiable all-gather: the gradient of each worker's rows is summed over
the workers that used them), rank 0 draws a permutation of the N and broadcasts it, worker r
runs the head on the n_r RoIs at positions offset_r … offset_r + n_r of the permutation, and the
outputs are gathered again and put back in the original order, worker r keeping its own n_r.
"""
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["RoIShuffle", "all_gather_rows", "row_counts", "shuffle_rois_across_workers"]

logger = logging.getLogger(__name__)


def _world(group):
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def row_counts(x, group=None):
    """The number of rows (first dimension) of ``x`` on every worker of ``group``, in rank order."""
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(_world(group))]
    dist.all_gather(counts, count, group=group)
    return [int(c) for c in counts]


class _AllGatherRows(torch.autograd.Function):
    """Concatenation over the group of every worker's rows (``counts[r]`` on worker r); backward:
    the sum over the workers of the gradient of this worker's rows."""

    @staticmethod
    def forward(ctx, x, counts, group):
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        rank = dist.get_rank(group)
        ctx.group, ctx.rows = group, (sum(counts[:rank]), counts[rank])
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start, count = ctx.rows
        return grad[start:start + count], None, None


def all_gather_rows(x, counts, group=None):
    """The rows of ``x`` of every worker of ``group`` (``counts`` from :func:`row_counts`), in rank
    order; differentiable."""
    return _AllGatherRows.apply(x, counts, group)


class RoIShuffle:
    """The shuffle of one head: a forward pre-hook on ``first`` (the head's first module) and a
    forward hook on ``last`` (its last), active in training forwards with more than one worker.

    Args:
        first, last (nn.Module): where the head's per-RoI computation starts and ends.
        group: the process group (None: the default one).
    """

    def __init__(self, first: nn.Module, last: nn.Module, group=None):
        self.group = group
        self._pending = None  # (permutation, counts) between the two hooks of one forward
        self.handles = [first.register_forward_pre_hook(self._shuffle),
                        last.register_forward_hook(self._restore)]

    def _active(self, module):
        return module.training and _world(self.group) > 1

    def _shuffle(self, module, args):
        if not self._active(module):
            return None
        x = args[0]
        counts = row_counts(x, self.group)
        rank = dist.get_rank(self.group)
        permutation = torch.randperm(sum(counts), device=x.device) if rank == 0 else \
            torch.empty(sum(counts), dtype=torch.long, device=x.device)
        dist.broadcast(permutation, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))  # this worker's positions, before and after
        self._pending = (permutation, counts, mine)
        return (all_gather_rows(x, counts, self.group)[permutation[mine]], *args[1:])

    def _restore(self, module, args, output):
        if self._pending is None:
            return None
        permutation, counts, mine = self._pending
        self._pending = None
        shuffled = all_gather_rows(output, counts, self.group)  # row i is the output of RoI permutation[i]
        return shuffled[torch.argsort(permutation)][mine]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _sequential_ends(head, where):
    children = list(head.children()) if isinstance(head, nn.Sequential) else []
    if not children:
        raise ValueError(f"D2NORM.SHUFFLE_ROIS: {where} ({type(head).__name__}) is not a sequential head of "
                         "modules (detectron2's FastRCNNConvFCHead / MaskRCNNConvUpsampleHead), so where its "
                         "per-RoI computation starts and ends is unknown")
    return children[0], children[-1]


def shuffle_rois_across_workers(model, group=None):
    """Install a :class:`RoIShuffle` on every box head and the mask head of a detectron2 R-CNN
    ``model`` (``roi_heads.box_head``, a cascade's ``roi_heads.box_head[i]``, ``roi_heads.mask_head``).
    Returns the shuffles.

    Raises:
        ValueError: the model has no such head, or one that is not sequential.
    """
    roi_heads = getattr(model, "roi_heads", None)
    heads = []
    if roi_heads is not None:
        box = getattr(roi_heads, "box_head", None)
        boxes = list(box) if isinstance(box, nn.ModuleList) else [box]
        heads += [(f"roi_heads.box_head{'' if len(boxes) == 1 else f'.{i}'}", b) for i, b in enumerate(boxes)
                  if b is not None]
        if getattr(roi_heads, "mask_on", False):
            heads.append(("roi_heads.mask_head", roi_heads.mask_head))
    if not heads:
        raise ValueError(f"D2NORM.SHUFFLE_ROIS: the {type(model).__name__} has no R-CNN box or mask head "
                         "(roi_heads.box_head / roi_heads.mask_head) to shuffle RoIs through")
    shuffles = [RoIShuffle(*_sequential_ends(head, where), group=group) for where, head in heads]
    logger.info(f"RoIs are shuffled across workers in training through {', '.join(w for w, _ in heads)}")
    return shuffles
