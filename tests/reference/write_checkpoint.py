"""Write a checkpoint of a small model with every d2norm layer, and what the model does next.

Run with the d2norm version whose checkpoint format is to be kept loadable, e.g. for the
committed ``checkpoint_b7c75ad.pt`` (d2norm at commit b7c75ad)::

    git worktree add /tmp/d2norm-b7c75ad b7c75ad
    PYTHONPATH=/tmp/d2norm-b7c75ad python tests/reference/write_checkpoint.py tests/reference/checkpoint_b7c75ad.pt

``tests/test_state_versions.py`` loads it with today's code and checks that the model continues
exactly: the same eval output and the same next training step.
"""
import copy
import sys

import torch
import torch.nn as nn
from detectron2.layers import Conv2d

import d2norm
from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d


def build():
    """Conv+CBN (window 3), conv+MABN (weight-centralised conv, r clipped after 2 steps), conv+PreciseBN."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=CrossIterationBatchNorm2d(8, window=3)),
        nn.ReLU(),
        Conv2d(8, 8, 3, padding=1, bias=False,
               norm=MovingAverageBatchNorm2d(8, buffer_size=2, warmup_iters=1, renorm_free_iters=2, rmax=1.5)),
        nn.ReLU(),
        Conv2d(8, 4, 3, padding=1, bias=False, norm=PreciseBatchNorm2d(4)),
    ).double()
    return d2norm.prepare_model(model, example_inputs=(torch.zeros(1, 3, 8, 8, dtype=torch.float64),))


def batch(step):
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64) * (1 + step % 3) + 0.5


def train_step(model, optimizer, step):
    optimizer.zero_grad()
    out = model(batch(step))
    (out.square().mean() + out.mean()).backward()
    optimizer.step()
    return out.detach()


def main(path):
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(6):
        train_step(model, optimizer, step)
    d2norm.recalibrate(model, [batch(100 + i) for i in range(2)], 2)
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    model.eval()
    with torch.no_grad():
        eval_output = model(batch(200))
    model.train()
    next_output = train_step(model, optimizer, 6)
    torch.save({**state, "eval_output": eval_output, "next_output": next_output,
                "next_state": model.state_dict()}, path)


if __name__ == "__main__":
    main(sys.argv[1])
