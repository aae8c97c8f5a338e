"""How many torch threads a CPU training process uses when the user has not said.

torch defaults to one intra-op thread per core in every process. On a small CPU that
oversubscribes the cores: the data-loader workers and the other ``--num-gpus`` processes compete
with those threads, and OpenMP threads that wait for a busy core stall every operator. Without
``OMP_NUM_THREADS`` set, each process therefore gets the cores left after its loader workers, split
evenly between processes, and at least one.
"""
import logging
import os

import torch

__all__ = ["default_cpu_threads", "set_default_cpu_threads"]

logger = logging.getLogger(__name__)


def default_cpu_threads(cores, num_processes, num_loader_workers):
    """``cores // num_processes - num_loader_workers``, at least 1."""
    return max(1, cores // max(1, num_processes) - num_loader_workers)


def set_default_cpu_threads(cfg, num_processes):
    """Set torch's thread count for CPU training with ``cfg`` unless ``OMP_NUM_THREADS`` is set.

    Returns the thread count set, or None when nothing was changed (a CUDA device, or the user's
    ``OMP_NUM_THREADS``, which torch already follows).
    """
    if not cfg.MODEL.DEVICE.startswith("cpu") or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = default_cpu_threads(cores, num_processes, cfg.DATALOADER.NUM_WORKERS)
    torch.set_num_threads(threads)
    logger.info(f"torch threads per process: {threads} ({cores} cores, {num_processes} processes, "
                f"{cfg.DATALOADER.NUM_WORKERS} data-loader workers each); set OMP_NUM_THREADS to choose")
    return threads
