"""Multi-process training without GPUs (gloo), next to detectron2's GPU launcher.

Detectron2's ``launch`` asserts CUDA and uses NCCL, and its ``create_ddp_model`` passes
``device_ids=[local_rank]``, which DDP rejects for CPU modules. On a machine without CUDA,
:func:`launch` spawns the workers itself with the gloo backend and :func:`cpu_ddp_compatible`
makes the trainer wrap CPU models without ``device_ids``. On GPU machines both defer to detectron2.
"""
import contextlib
import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from .._compat import set_local_process_group

__all__ = ["launch", "cpu_ddp_compatible", "free_port"]

logger = logging.getLogger(__name__)


def launch(main_func, num_processes, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30)):
    """Run ``main_func(*args)`` in ``num_processes`` processes per machine.

    With CUDA this is detectron2's ``launch`` (one process per GPU, NCCL). Without CUDA, the
    processes run on the CPU and communicate through gloo; ``dist_url="auto"`` picks a free port.
    """
    if torch.cuda.is_available():
        d2_launch(main_func, num_processes, num_machines, machine_rank, dist_url, args=args, timeout=timeout)
        return
    world_size = num_machines * num_processes
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto works for one machine only; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{free_port()}"
    logger.info(f"No CUDA: launching {num_processes} CPU processes with the gloo backend ({dist_url})")
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes,
        args=(main_func, world_size, num_processes, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def free_port():
    """A TCP port of this machine that is free now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    set_local_process_group(num_per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def cpu_ddp_compatible():
    """Within the block, detectron2's ``create_ddp_model`` wraps CPU models without ``device_ids``."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original
