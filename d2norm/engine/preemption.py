"""Preemption-safe training: a signal becomes one checkpoint and an exit that asks to be requeued.

Clusters preempt. SLURM sends a signal before it kills a job (``#SBATCH --signal=USR1@90``, or
SIGTERM at the time limit); torchrun sends SIGTERM to its workers. :class:`CheckpointOnSignal`
notes SIGTERM or SIGUSR1, lets every rank finish the iteration it is in, agrees across ranks on
the iteration to stop after (one all-reduce every ``period`` iterations), writes one checkpoint
with the model (every norm layer's state included), optimizer, scheduler and iteration, and raises
:class:`Preempted`. ``tools/train_net.py`` then exits with :data:`REQUEUE_EXIT_CODE` after asking
SLURM to requeue the job (``scontrol requeue``, when it exists); the next start with ``--resume``
continues from that checkpoint. A signal that arrives while the checkpoint is written only sets the
flag again: the write finishes, and the previous checkpoint stays the one ``last_checkpoint``
names until it has.
"""
import logging
import os
import shutil
import signal
import subprocess
import threading

import torch
import torch.distributed as dist
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

__all__ = ["CheckpointOnSignal", "PREEMPTION_SIGNALS", "Preempted", "REQUEUE_EXIT_CODE", "request_requeue"]

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing the checkpoint ``path`` at ``iteration``."""

    def __init__(self, signum, iteration, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; checkpoint {path}")
        self.signum, self.iteration, self.path = signum, iteration, path


class CheckpointOnSignal(HookBase):
    """On SIGTERM/SIGUSR1: finish the iteration, checkpoint, raise :class:`Preempted`.

    Args:
        checkpointer: the trainer's checkpointer (saves on the main process).
        period (int): iterations between the checks that all ranks agree on (one all-reduce of a
            scalar each; on a GPU a device-to-host copy). With SLURM's 90 s warning and ~1 s per
            iteration, 10 leaves ample time.
    """

    def __init__(self, checkpointer, period=10):
        self.checkpointer = checkpointer
        self.period = period
        self.received = None
        self._previous = {}

    def _note(self, signum, frame):
        self.received = signum
        logger.warning(f"Received {signal.Signals(signum).name}: checkpointing at the next check, then exiting")

    def before_train(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Not in the main thread: preemption signals are not handled")
            return
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)

    def after_train(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _agreed_signal(self):
        """The signal any rank received (0: none), the same on every rank."""
        received = torch.tensor([self.received or 0], dtype=torch.int64)
        if comm.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                received = received.cuda()
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received.item())

    def after_step(self):
        iteration = self.trainer.iter
        if (iteration + 1) % self.period and iteration + 1 != self.trainer.max_iter:
            return
        signum = self._agreed_signal()
        if not signum or iteration + 1 == self.trainer.max_iter:
            return
        name = f"model_{iteration:07d}"
        self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        raise Preempted(signum, iteration, os.path.join(self.checkpointer.save_dir, name + ".pth"))


def request_requeue():
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``); True if it was asked."""
    job = os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if not (job and scontrol):
        return False
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if result.returncode:
        logger.warning(f"scontrol requeue {job} failed: {result.stderr.strip()}")
    return result.returncode == 0
