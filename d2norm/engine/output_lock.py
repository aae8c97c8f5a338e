"""One training per output directory.

Two trainings writing into one ``OUTPUT_DIR`` both "succeed" with an interleaved ``metrics.json``
and each other's checkpoints. :func:`output_dir_lock` holds an exclusive ``flock`` on
``OUTPUT_DIR/.d2norm-training.lock`` for the duration of a training; a second training into the
same directory is refused with a message naming the holder. The operating system releases the lock
when its process ends, however it ends, so a killed run leaves no stale lock behind (the file stays,
unlocked). Local file systems and NFS (where Linux maps ``flock`` to POSIX locks) are supported.
"""
import contextlib
import fcntl
import os
import socket

__all__ = ["OutputDirBusyError", "output_dir_lock"]

LOCK_NAME = ".d2norm-training.lock"


class OutputDirBusyError(RuntimeError):
    """Another live training holds the output directory."""


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """Hold ``output_dir`` (created if missing) exclusively within the block.

    Raises:
        OutputDirBusyError: another process holds it (the message names its pid and host).
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputDirBusyError(
                f"OUTPUT_DIR {output_dir} is in use by another training ({holder}; lock file {path}). "
                "Wait for it to finish or stop it, or train into another OUTPUT_DIR."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
