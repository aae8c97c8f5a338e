"""Multi-process training: cluster launchers (torchrun, SLURM), and CPU processes next to
detectron2's GPU launcher.

A process started by ``torchrun`` or ``srun`` (:mod:`d2norm.engine.cluster_env`) joins the job's
process group itself (NCCL with CUDA, else gloo) and runs the trainer; nothing is spawned and
``--num-gpus``/``--num-machines`` are not needed. Otherwise detectron2's ``launch`` spawns one
process per GPU; it asserts CUDA and uses NCCL, and its ``create_ddp_model`` passes
``device_ids=[local_rank]``, which DDP rejects for CPU modules. On a machine without CUDA,
:func:`launch` spawns the workers itself with the gloo backend and :func:`cpu_ddp_compatible`
makes the trainer wrap CPU models without ``device_ids``. On GPU machines both defer to detectron2.
"""
import contextlib
import logging
import os
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from .._compat import set_local_process_group
from .cluster_env import cluster_process
from .preemption import PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE

__all__ = ["launch", "cpu_ddp_compatible", "free_port", "join_cluster_job"]

logger = logging.getLogger(__name__)


def launch(main_func, num_processes, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30)):
    """Run ``main_func(*args)`` in ``num_processes`` processes per machine.

    Under torchrun or SLURM with several processes this process is one of the job's: it joins them
    (:func:`join_cluster_job`). A single task (``srun -n 1 ... --num-gpus 8``) launches as below.
    Otherwise, with CUDA this is detectron2's ``launch`` (one process per GPU, NCCL); without CUDA,
    the processes run on the CPU and communicate through gloo; ``dist_url="auto"`` picks a free port.
    """
    process = cluster_process()
    if process is not None and process.world_size > 1:
        join_cluster_job(process, main_func, args, timeout, requested=num_processes * num_machines)
        return
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
    context = mp.start_processes(
        _cpu_worker,
        nprocs=num_processes,
        args=(main_func, world_size, num_processes, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    _join_forwarding_preemption(context)


def _join_forwarding_preemption(context):
    """Wait for the workers; a preemption signal sent to this launcher goes on to them, and workers
    that stopped to be requeued (:data:`~d2norm.engine.preemption.REQUEUE_EXIT_CODE`) make it exit so."""
    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in PREEMPTION_SIGNALS}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as error:
        if error.exit_code != REQUEUE_EXIT_CODE:
            raise
        for process in context.processes:
            process.join()
        sys.exit(REQUEUE_EXIT_CODE)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def join_cluster_job(process, main_func, args=(), timeout=timedelta(minutes=30), requested=1):
    """Run ``main_func(*args)`` as ``process`` (a :class:`~d2norm.engine.cluster_env.ClusterProcess`)
    of a job of several processes: the process group through ``env://`` at the job's master address (NCCL on this
    process's GPU with CUDA, else gloo) and detectron2's per-machine group."""
    if requested not in (1, process.world_size):
        logger.warning(f"{process.launcher} started {process.world_size} processes; --num-gpus x --num-machines "
                       f"= {requested} is ignored")
    logger.info(f"Started by {process.launcher}: rank {process.rank} of {process.world_size} (local rank "
                f"{process.local_rank} of {process.local_world_size}), rendezvous at "
                f"{process.master_addr}:{process.master_port}")
    os.environ.setdefault("MASTER_ADDR", process.master_addr)
    os.environ.setdefault("MASTER_PORT", str(process.master_port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(process.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", world_size=process.world_size,
                            rank=process.rank, timeout=timeout)
    set_local_process_group(process.local_world_size, process.machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


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
