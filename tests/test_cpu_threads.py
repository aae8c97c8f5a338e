"""Default torch threads for CPU training: the cores left after the loader workers, per process."""
import pytest
import torch
from detectron2.config import get_cfg

from d2norm.cpu_threads import default_cpu_threads, set_default_cpu_threads


@pytest.mark.parametrize(
    "cores, processes, workers, expected",
    [(2, 1, 1, 1), (2, 1, 0, 2), (2, 2, 1, 1), (16, 1, 4, 12), (16, 2, 2, 6), (1, 1, 4, 1)],
)
def test_cores_left_after_loader_workers_split_between_processes(cores, processes, workers, expected):
    assert default_cpu_threads(cores, processes, workers) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_omp_num_threads_or_a_cuda_device_leave_torch_alone(monkeypatch, restore_threads):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_default_cpu_threads(cfg, 1) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    cfg.MODEL.DEVICE = "cuda"
    assert set_default_cpu_threads(cfg, 1) is None
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0
    threads = set_default_cpu_threads(cfg, 1)
    assert threads >= 1 and torch.get_num_threads() == threads
