"""How many torch threads a CPU training process uses when the user has not said.

torch defaults to one intra-op thread per core in every process, so ``--num-gpus N`` CPU processes
would oversubscribe the cores N times, and OpenMP threads that wait for a busy core stall every
operator. Without ``OMP_NUM_THREADS`` set, each process therefore gets an equal share of the cores,
at least one. Data-loader workers are not subtracted: they mostly wait for the model (the demo on
an idle 2-core machine: data time 0.008 of 0.27 s per iteration; 0.272 s/iteration with 2 threads,
0.361 s with 1). On a machine busy with other work, ``OMP_NUM_THREADS=1`` is faster.
"""
import logging
import os

import torch

__all__ = ["default_cpu_threads", "set_default_cpu_threads"]

logger = logging.getLogger(__name__)


def default_cpu_threads(cores, num_processes):
    """``cores // num_processes``, at least 1."""
    return max(1, cores // max(1, num_processes))


def set_default_cpu_threads(cfg, num_processes):
    """Set torch's thread count for CPU training with ``cfg`` unless ``OMP_NUM_THREADS`` is set.

    Returns the thread count set, or None when nothing was changed (a CUDA device, or the user's
    ``OMP_NUM_THREADS``, which torch already follows).
    """
    if not cfg.MODEL.DEVICE.startswith("cpu") or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = default_cpu_threads(cores, num_processes)
    torch.set_num_threads(threads)
    logger.info(f"torch threads per process: {threads} ({cores} cores, {num_processes} processes); "
                "set OMP_NUM_THREADS to choose (1 is faster on a machine busy with other work)")
    return threads
