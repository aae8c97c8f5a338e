"""The process a cluster launcher started: torchrun's or SLURM's environment, read once.

A job started by ``torchrun`` (``torch.distributed.run``) has ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; one started by ``srun``
has ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST`` (compressed:
``gpu[01-04,07],login2``) and the tasks per node. Either way every process already exists: the
trainer joins the process group (``env://``) instead of spawning workers.
"""
import os
import re
from dataclasses import dataclass

__all__ = ["ClusterProcess", "cluster_process", "expand_hostlist"]


@dataclass(frozen=True)
class ClusterProcess:
    """Where this process sits in the job, and how to reach rank 0."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def machine_rank(self):
        return self.rank // self.local_world_size

    @property
    def num_machines(self):
        return self.world_size // self.local_world_size


def expand_hostlist(hostlist):
    """SLURM's compressed host list -> host names in order: ``"gpu[01-03,07],login2"`` ->
    ``["gpu01", "gpu02", "gpu03", "gpu07", "login2"]`` (zero padding kept; one bracket per name)."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", hostlist):
        prefix, ranges, suffix = match.groups()
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    return hosts


def _tasks_per_node(environ, num_tasks):
    """Tasks on this node: ``SLURM_NTASKS_PER_NODE``, else the first entry of ``SLURM_TASKS_PER_NODE``
    (``"4(x2),3"``), else all tasks over ``SLURM_NNODES``."""
    if "SLURM_NTASKS_PER_NODE" in environ:
        return int(environ["SLURM_NTASKS_PER_NODE"])
    if "SLURM_TASKS_PER_NODE" in environ:
        return int(re.match(r"\d+", environ["SLURM_TASKS_PER_NODE"]).group())
    return num_tasks // int(environ.get("SLURM_NNODES", "1"))


def cluster_process(environ=os.environ):
    """The :class:`ClusterProcess` that ``environ`` describes, or None when no cluster launcher
    started this process (a plain ``python tools/train_net.py``). torchrun's variables win over
    SLURM's (torchrun inside an allocation). SLURM's master port is derived from the job id
    (``SLURM_JOB_ID``), so every task of a job computes the same one."""
    if all(key in environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        world_size = int(environ["WORLD_SIZE"])
        return ClusterProcess(
            "torchrun", int(environ["RANK"]), world_size, int(environ["LOCAL_RANK"]),
            int(environ.get("LOCAL_WORLD_SIZE", world_size)), environ["MASTER_ADDR"], int(environ["MASTER_PORT"]),
        )
    if all(key in environ for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")):
        num_tasks = int(environ["SLURM_NTASKS"])
        hosts = expand_hostlist(environ["SLURM_JOB_NODELIST"])
        if not hosts:
            raise ValueError(f"SLURM_JOB_NODELIST={environ['SLURM_JOB_NODELIST']!r} names no host")
        port = int(environ.get("MASTER_PORT", 10000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
        return ClusterProcess(
            "slurm", int(environ["SLURM_PROCID"]), num_tasks, int(environ["SLURM_LOCALID"]),
            _tasks_per_node(environ, num_tasks), environ.get("MASTER_ADDR", hosts[0]), port,
        )
    return None
