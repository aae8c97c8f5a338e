"""d2norm.engine.nonfinite_report: a non-finite batch skipped by a layer is logged and recorded."""
import logging
from types import SimpleNamespace

import torch
import torch.nn as nn
from detectron2.utils.events import EventStorage

import d2norm
from d2norm.engine.nonfinite_report import ReportNonFiniteSkips


def test_skips_are_recorded_and_the_layers_named_once(caplog):
    model = d2norm.prepare_model(nn.Sequential(
        nn.Conv2d(3, 4, 3), d2norm.CrossIterationBatchNorm2d(4, window=2),
        nn.Conv2d(4, 4, 1), d2norm.MovingAverageBatchNorm2d(4),
    ), example_inputs=(torch.zeros(1, 3, 5, 5),))
    hook = ReportNonFiniteSkips(model, period=2)
    with EventStorage() as storage:
        hook.trainer = SimpleNamespace(iter=0, max_iter=10, storage=storage)
        for iteration, bad in enumerate([False, True, False, False]):
            x = torch.randn(2, 3, 5, 5)
            if bad:
                x[0, 0, 0, 0] = float("nan")
            model(x.requires_grad_()).sum().backward()
            hook.trainer.iter = iteration
            with caplog.at_level(logging.WARNING, logger="d2norm.engine.nonfinite_report"):
                hook.after_step()
            storage.step()
        assert storage.history("d2norm/nonfinite_skips").values()[-1][0] == 2
    assert caplog.text.count("non-finite") == 1
    assert "Iteration 2" in caplog.text and "of 1 (+1), 3 (+1)" in caplog.text
