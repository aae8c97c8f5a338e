"""The non-public torch and detectron2 internals d2norm relies on, in one place.

Each is pinned by ``tests/test_compat.py`` against the installed versions, so a torch or detectron2
upgrade that changes one fails there, by name, rather than somewhere inside a training:

* ``torch._C._current_graph_task_id()`` (-1 outside an autograd backward): how CBN and MABN
  recognise being recomputed by activation checkpointing (:mod:`d2norm.layers.recomputation`);
* ``torch.ops.aten.native_batch_norm_backward`` and the order of its three results (input
  gradient, per-channel sum of grad·x̂, per-channel sum of grad): the fused reductions of CBN's and
  MABN's backward passes;
* ``detectron2.utils.comm._LOCAL_PROCESS_GROUP`` (detectron2 v0.6, which has no
  ``create_local_process_group``): the per-machine group of CPU multi-process training.

Importing this module imports torch only.
"""
import torch

__all__ = ["batch_norm_backward_reductions", "inside_autograd_backward", "set_local_process_group"]


def inside_autograd_backward():
    """True while an autograd backward runs this code (e.g. an activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def batch_norm_backward_reductions(grad_out, x, weight, mean, var, eps, input_grad):
    """``(grad_input or None, sum(grad_out * x_hat), sum(grad_out))`` per channel, for
    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with ``mean``/``var`` held fixed (inference
    form); ``grad_input`` only if ``input_grad``. ``x_hat`` is the normalized input."""
    return torch.ops.aten.native_batch_norm_backward(
        grad_out, x, weight, mean, var, None, None, False, eps, [input_grad, True, True]
    )


def set_local_process_group(num_per_machine, machine_rank):
    """Create detectron2's per-machine process group (``comm.get_local_rank``/``get_local_size``),
    on detectron2 main through its public function, on v0.6 by setting the module variable it reads.
    Every rank must call it (``new_group`` is collective)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(num_per_machine)
        return
    for i in range(dist.get_world_size() // num_per_machine):  # detectron2 v0.6
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
