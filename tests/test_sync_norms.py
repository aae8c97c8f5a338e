"""Synchronised norms on gloo: R processes of b images train as one process of R·b images (outputs,
input and parameter gradients, layer state, through burn-in / warm-up and the window), uneven and
empty batches included, in float64."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import d2norm
from d2norm.engine.launch import free_port
from d2norm.layers import (
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    SyncCrossIterationBatchNorm2d,
    SyncMovingAverageBatchNorm2d,
)

STEPS = 7
# MABN: warm-up ends at 2, SMAS from 3, r clipped from 4; CBN: burn-in 2, then the window fills.
LAYERS = {
    "SyncMABN": lambda: SyncMovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=2, renorm_free_iters=3, rmax=1.2),
    "SyncCBN": lambda: SyncCrossIterationBatchNorm2d(4, window=3, burnin_iters=2),
}
UNSYNCED = {
    "SyncMABN": lambda: MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=2, renorm_free_iters=3, rmax=1.2),
    "SyncCBN": lambda: CrossIterationBatchNorm2d(4, window=3, burnin_iters=2),
}


def _model(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), make()).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return d2norm.prepare_model(model, example_inputs=(torch.zeros(1, 3, 5, 5, dtype=torch.float64),))


def _data(sizes):
    """Per step: the inputs and output gradients of every rank (``sizes[r]`` images each)."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for t in range(STEPS):
        xs = [torch.randn(n, 3, 5, 5, generator=generator, dtype=torch.float64) * (1 + t) + 0.3 for n in sizes]
        gs = [torch.randn(n, 4, 5, 5, generator=generator, dtype=torch.float64) for n in sizes]
        steps.append((xs, gs))
    return steps


def _train(model, steps, rank=None):
    """Per step: output, input gradient and parameter gradients (summed over ranks, as DDP does up
    to its 1/R) of ``rank``'s share (or of all images), then an SGD step so the conv weight moves."""
    record = []
    for xs, gs in steps:
        x = (torch.cat(xs) if rank is None else xs[rank]).clone().requires_grad_()
        y = model(x)
        y.backward(torch.cat(gs) if rank is None else gs[rank])
        grads = [p.grad for p in model.parameters()]
        if rank is not None:
            for grad in grads:
                dist.all_reduce(grad)
        record.append((y.detach(), x.grad, [g.clone() for g in grads]))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    return record


def _rank_main(rank, world_size, port, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, make in LAYERS.items():  # one process group for every layer
            model = _model(make)
            results[name] = {"record": _train(model, _data(sizes), rank), "state": model.state_dict()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(3, 1), (2, 1, 0, 1)], ids=["2 ranks uneven", "4 ranks, one empty"])
def test_r_ranks_train_as_one_process_with_all_images(sizes, tmp_path):
    mp.spawn(_rank_main, args=(len(sizes), free_port(), sizes, str(tmp_path)), nprocs=len(sizes))
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    saved = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(len(sizes))]
    for name, make in LAYERS.items():
        reference = _model(make)
        expected = _train(reference, _data(sizes))
        for rank, n in enumerate(sizes):
            part = slice(offsets[rank], offsets[rank] + n)
            record = saved[rank][name]["record"]
            for t, ((y, dx, grads), (y_ref, dx_ref, grads_ref)) in enumerate(zip(record, expected)):
                where = f"{name}, rank {rank}, step {t}"
                torch.testing.assert_close(y, y_ref[part], rtol=1e-10, atol=1e-12, msg=where)
                torch.testing.assert_close(dx, dx_ref[part], rtol=1e-10, atol=1e-12, msg=where)
                for grad, grad_ref in zip(grads, grads_ref):
                    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12, msg=where)
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(saved[rank][name]["state"][key], value, rtol=1e-10, atol=1e-12,
                                           msg=f"{name}, rank {rank}, {key}")
        if name == "SyncCBN":
            assert reference[1].pools_window() and int(reference[1].history_length) == 2  # the window was used


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_without_a_process_group_it_is_the_per_process_layer_and_a_multi_process_job_is_an_error(name, monkeypatch):
    synced, plain = _model(LAYERS[name]), _model(UNSYNCED[name])
    steps = _data((2,))
    for (y, dx, _), (y_ref, dx_ref, _) in zip(_train(synced, steps), _train(plain, steps)):
        torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-13)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(RuntimeError, match=f"{name}.*process group.*WORLD_SIZE is 8"):
        synced(torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True))
    assert type(d2norm.get_norm(name, 3)).__name__.startswith("Sync")
