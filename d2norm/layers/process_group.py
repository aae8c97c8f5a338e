"""What the synchronised layers (SyncCBN, SyncMABN) share: the size of their process group and a
sum over it in one all-reduce."""
import os

import torch
import torch.distributed as dist

__all__ = ["group_size", "sum_over_group"]


def group_size(process_group, layer):
    """The number of processes in ``process_group`` (None: the default group); 1 without an
    initialised ``torch.distributed``, unless the environment says the job has several processes
    (``WORLD_SIZE`` > 1), which raises an error naming ``layer`` (its statistics would silently be
    per process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            f"{type(layer).__name__} ({layer.kind}) needs an initialised torch.distributed process group: "
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but torch.distributed is not initialised. Initialise "
            f"it (detectron2's launch does) or use {layer.kind.removeprefix('Sync')} for per-process statistics."
        )
    return 1


def sum_over_group(tensors, process_group, layer):
    """``tensors`` (a list) summed over ``process_group`` in one all-reduce; as they are alone."""
    if group_size(process_group, layer) == 1:
        return tensors
    packed = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(packed, group=process_group)
    sums, offset = [], 0
    for t in tensors:
        sums.append(packed[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return sums
