"""Default torch threads for CPU training: an equal share of the cores per process."""
import pytest
import torch
from detectron2.config import get_cfg

from d2norm.engine.cpu_threads import default_cpu_threads, set_default_cpu_threads


@pytest.mark.parametrize("cores, processes, expected", [(2, 1, 2), (2, 2, 1), (16, 1, 16), (16, 3, 5), (1, 4, 1)])
def test_processes_share_the_cores_without_oversubscribing(cores, processes, expected):
    assert default_cpu_threads(cores, processes) == expected
    assert expected * processes <= max(cores, processes)


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
    threads = set_default_cpu_threads(cfg, 1)
    assert threads >= 1 and torch.get_num_threads() == threads
