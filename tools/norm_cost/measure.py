"""Time and memory of one training step, side by side: the measures of ``tools/benchmark_norm.py``."""
import os
import platform
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2.0**20


class _LiveStorages(TorchDispatchMode):
    """Running total and peak of the bytes held by storages that ops create inside the mode.

    An op output that aliases one of its inputs (views, in-place ops) allocates nothing; a storage
    leaves the total when it is freed (weak reference callback).
    """

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, key, _ref):
        self.current -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = (size, weakref.ref(storage, lambda ref, key=key: self._release(key, ref)))
            self.current += size
            self.peak = max(self.peak, self.current)
        return out


def step_memory(forward, backward, device):
    """Run ``backward(forward())`` once. Returns bytes above the allocation at the start of the step:
    ``(held after forward, peak)``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = forward()
        torch.cuda.synchronize(device)
        after_forward = torch.cuda.memory_allocated(device) - start
        backward(out)
        del out
        torch.cuda.synchronize(device)
        return after_forward, torch.cuda.max_memory_allocated(device) - start
    with _LiveStorages() as tracker:
        out = forward()
        after_forward = tracker.current
        backward(out)
        del out
    return after_forward, tracker.peak


def memory_method(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus the allocation at step start"
    return "peak of live tensor storages created during the step (TorchDispatchMode tracker; op scratch space excluded)"


def timed(forward, backward, device):
    """Wall-clock seconds of ``backward(forward())``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    backward(forward())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def progress(message):
    """One progress line on stderr (the report itself goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def ratios(a, b, state=False):
    """``a / b``; for time the median of per-round ratios (a round times every variant once in turn,
    so a change in machine load between rounds cancels)."""
    ratios = {
        "time": statistics.median(ta / tb for ta, tb in zip(a["times_s"], b["times_s"])),
        "peak_memory": a["peak_bytes"] / b["peak_bytes"],
        "forward_memory": a["forward_bytes"] / b["forward_bytes"],
    }
    if state:
        ratios["window_state"] = a["window_state_bytes"] / b["window_state_bytes"]
    return ratios


def environment(device):
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
