"""No host synchronisation in a training step: every layer trains on the ``meta`` device, where any
read of a tensor's value (``int()``, ``.item()``, ``bool()``) raises, through burn-in / warm-up and
past it. On a GPU such a read would stall the step once per layer."""
import pytest
import torch
import torch.nn as nn

import d2norm
from d2norm.layers import (
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    PreciseBatchNorm2d,
    SyncCrossIterationBatchNorm2d,
    SyncMovingAverageBatchNorm2d,
)

LAYERS = {
    "BN": lambda: nn.BatchNorm2d(4),
    "PreciseBN": lambda: PreciseBatchNorm2d(4),
    "CBN": lambda: CrossIterationBatchNorm2d(4, window=3, burnin_iters=2),
    "MABN": lambda: MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=2, renorm_free_iters=3),
    "BRN": lambda: BatchRenorm2d(4, warmup_iters=1, rmax_iters=3, dmax_iters=2),
    "SyncCBN (no group)": lambda: SyncCrossIterationBatchNorm2d(4, window=3, burnin_iters=2),
    "SyncMABN (no group)": lambda: SyncMovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=2, renorm_free_iters=3),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_training_past_warmup_reads_no_tensor_value(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), LAYERS[name]())
    d2norm.prepare_model(model, example_inputs=(torch.zeros(1, 3, 6, 6),))
    model.to("meta").train()
    for _ in range(6):
        x = torch.empty(2, 3, 6, 6, device="meta", requires_grad=True)
        out = model(x)
        out.sum().backward()
        for p in model.parameters():
            p.grad = None
    norm = model[1]
    if name.startswith(("CBN", "SyncCBN")):
        assert norm.pools_window()  # the window path ran
    assert all(t.device.type == "meta" for t in norm.state_dict().values())
