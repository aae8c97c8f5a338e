"""Synchronised norms on gloo: R processes of b images train as one process of R·b images (outputs,
input and parameter gradients, layer state), uneven and empty batches included, in float64."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import d2norm
from d2norm.layers import MovingAverageBatchNorm2d, SyncMovingAverageBatchNorm2d

STEPS = 7  # warm-up ends at 2, SMAS from 3, r clipped from 4
SETTINGS = dict(buffer_size=2, warmup_iters=2, renorm_free_iters=3, rmax=1.2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer():
    torch.manual_seed(0)
    layer = SyncMovingAverageBatchNorm2d(3, **SETTINGS).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _data(sizes):
    """Per step: the inputs and output gradients of every rank (``sizes[r]`` images each)."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for t in range(STEPS):
        xs = [torch.randn(n, 3, 4, 4, generator=generator, dtype=torch.float64) * (1 + t) + 0.3 for n in sizes]
        gs = [torch.randn(n, 3, 4, 4, generator=generator, dtype=torch.float64) for n in sizes]
        steps.append((xs, gs))
    return steps


def _train(layer, steps, rank=None):
    """Outputs, input gradients and parameter gradients per step (of ``rank``'s share, or of all)."""
    record = []
    for xs, gs in steps:
        x = (torch.cat(xs) if rank is None else xs[rank]).clone().requires_grad_()
        g = torch.cat(gs) if rank is None else gs[rank]
        y = layer(x)
        y.backward(g)
        grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
        layer.weight.grad = layer.bias.grad = None
        record.append((y.detach(), x.grad, grads))
    return record


def _rank_main(rank, world_size, port, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        layer = _layer()
        record = _train(layer, _data(sizes), rank)
        for step in record:  # parameter gradients summed over ranks, as DDP does (up to its 1/R)
            for grad in step[2]:
                dist.all_reduce(grad)
        torch.save({"record": record, "state": layer.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(3, 1), (2, 1, 0, 1)], ids=["2 ranks uneven", "4 ranks, one empty"])
def test_sync_mabn_on_r_ranks_is_mabn_on_one_process_with_all_images(sizes, tmp_path):
    mp.spawn(_rank_main, args=(len(sizes), _free_port(), sizes, str(tmp_path)), nprocs=len(sizes))
    reference = _layer()
    expected = _train(reference, _data(sizes))
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    for rank, n in enumerate(sizes):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for (y, dx, grads), (y_ref, dx_ref, grads_ref) in zip(saved["record"], expected):
            part = slice(offsets[rank], offsets[rank] + n)
            torch.testing.assert_close(y, y_ref[part], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(dx, dx_ref[part], rtol=1e-10, atol=1e-12)
            for grad, grad_ref in zip(grads, grads_ref):
                torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(saved["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_without_a_process_group_it_is_mabn_and_a_multi_process_job_is_an_error(monkeypatch):
    layer, plain = _layer(), MovingAverageBatchNorm2d(3, **SETTINGS).double()
    plain.load_state_dict(layer.state_dict())
    steps = _data((2,))
    for (y, dx, _), (y_ref, dx_ref, _) in zip(_train(layer, steps), _train(plain, steps)):
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-14)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(RuntimeError, match="SyncMABN.*process group.*WORLD_SIZE is 8"):
        layer(torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True))
    assert isinstance(d2norm.get_norm("SyncMABN", 3), SyncMovingAverageBatchNorm2d)
