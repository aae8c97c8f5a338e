"""Recalibration before evaluation and at the end; frozen norms for the last N iterations."""
import itertools

import pytest
import torch
import torch.nn as nn
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer, hooks
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils.events import EventStorage

from d2norm.config.defaults import add_d2norm_config
from d2norm.engine.hooks import FreezeNormLastIters, NormRecalibrator, RecalibrateNorms, build_norm_hooks
from d2norm.layers import PreciseBatchNorm2d
from d2norm.statistics.monitor import NormStatsMonitor


class TinyDetector(nn.Module):
    """Returns a loss dict like a detectron2 model; records the norm's mode at every training step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = PreciseBatchNorm2d(4)
        self.norm_training = []

    def forward(self, x):
        if torch.is_grad_enabled():  # a training step, not a recalibration forward
            self.norm_training.append(self.norm.training)
        return {"loss": self.norm(self.conv(x)).sigmoid().mean()}


def _batches(seed):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(2, 3, 4, 4, generator=generator)


class Events:
    """What happened, in order: ("recalibrate", iter), ("eval", iter), ("step", iter, norm mode)."""

    def __init__(self):
        self.log = []
        self.trainer = None

    def iteration(self, kind):
        return [e[1] for e in self.log if e[0] == kind]


def _recording_recalibrator(model, events):
    recalibrator = NormRecalibrator(model, _batches(seed=1), num_iter=2)

    def recalibrate():
        events.log.append(("recalibrate", events.trainer.iter))
        recalibrator()

    return recalibrate


def _train(model, norm_hooks, events, max_iter, eval_period=0, start_iter=0):
    def evaluate():
        with inference_context(model), torch.no_grad():  # raises if the norm was never recalibrated
            model.norm(model.conv(next(_batches(seed=2))))
        events.log.append(("eval", trainer.iter))
        return {}

    trainer = SimpleTrainer(model, _batches(seed=0), torch.optim.SGD(model.parameters(), lr=0.1))
    events.trainer = trainer
    trainer.register_hooks(norm_hooks + [hooks.EvalHook(eval_period, evaluate)])
    trainer.train(start_iter, max_iter)
    return trainer


def test_recalibrates_before_every_evaluation_and_at_the_end():
    model, events = TinyDetector(), Events()
    _train(model, [RecalibrateNorms(_recording_recalibrator(model, events), eval_period=3)], events,
           max_iter=7, eval_period=3)
    assert events.iteration("recalibrate") == [2, 5, 6]  # next_iter 3, 6 and max_iter 7
    assert [e[0] for e in events.log] == ["recalibrate", "eval"] * 3


def test_period_adds_recalibrations_between_evaluations():
    model, events = TinyDetector(), Events()
    hook = RecalibrateNorms(_recording_recalibrator(model, events), eval_period=0, period=2)
    _train(model, [hook], events, max_iter=7)
    assert events.iteration("recalibrate") == [1, 3, 5, 6]


def test_training_with_precise_bn_but_without_the_hook_cannot_evaluate():
    model, events = TinyDetector(), Events()
    with pytest.raises(RuntimeError, match="d2norm.recalibrate"):
        _train(model, [], events, max_iter=2)


def test_freezes_the_norms_exactly_for_the_last_iterations_after_one_recalibration():
    model, events = TinyDetector(), Events()
    recalibrate = _recording_recalibrator(model, events)
    frozen_stats = []
    norm_hooks = [
        FreezeNormLastIters(3, model, recalibrate),
        hooks.CallbackHook(after_step=lambda t: frozen_stats.append(model.norm.running_var.clone())),
        RecalibrateNorms(recalibrate, eval_period=8),
    ]
    _train(model, norm_hooks, events, max_iter=10, eval_period=8)
    assert model.norm_training == [True] * 7 + [False] * 3  # also after the evaluation at iter 7
    assert events.iteration("recalibrate")[0] == 7
    assert model.training
    # The statistics used in the frozen iterations are the ones saved and evaluated at the end.
    assert all(torch.equal(s, frozen_stats[7]) for s in frozen_stats[7:])
    assert torch.equal(model.norm.running_var, frozen_stats[7])


@pytest.mark.parametrize("start_iter, recalibrations", [(7, [7]), (8, []), (9, [])])
def test_freezing_holds_after_resuming_into_the_last_iterations(start_iter, recalibrations):
    trained, events = TinyDetector(), Events()
    checkpoint = {}

    def save(trainer):  # a checkpoint written after iteration start_iter - 1, as detectron2 does
        if trainer.iter == start_iter - 1:
            checkpoint.update({k: v.clone() for k, v in trained.state_dict().items()})

    _train(trained, [FreezeNormLastIters(3, trained, _recording_recalibrator(trained, events)),
                     hooks.CallbackHook(after_step=save)], events, max_iter=10)
    model, events = TinyDetector(), Events()
    model.load_state_dict(checkpoint)
    _train(model, [FreezeNormLastIters(3, model, _recording_recalibrator(model, events))], events,
           max_iter=10, start_iter=start_iter)
    assert model.norm_training == [False] * (10 - start_iter)
    assert events.iteration("recalibrate") == recalibrations
    # Resumed past the switch, the frozen statistics are the checkpoint's; at the switch, new ones.
    assert torch.equal(model.norm.running_var, checkpoint["norm.running_var"]) == (start_iter > 7)
    assert torch.equal(model.norm.running_var, trained.norm.running_var)  # as without the resume


def _cfg(enabled=True, freeze=0, period=0, eval_period=5):
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.D2NORM.PRECISE_BN.ENABLED = enabled
    cfg.D2NORM.PRECISE_BN.NUM_ITER = 4
    cfg.D2NORM.PRECISE_BN.PERIOD = period
    cfg.D2NORM.FREEZE_NORM_LAST_ITERS = freeze
    cfg.TEST.EVAL_PERIOD = eval_period
    cfg.DATALOADER.NUM_WORKERS = 4
    return cfg


@pytest.mark.parametrize("enabled, freeze, types", [
    (True, 0, [RecalibrateNorms]),
    (True, 3, [RecalibrateNorms, FreezeNormLastIters]),
    (False, 3, [FreezeNormLastIters]),
    (False, 0, []),
])
def test_build_norm_hooks_follows_the_config(enabled, freeze, types):
    loader_cfgs = []

    def build_train_loader(cfg):
        loader_cfgs.append(cfg)
        return _batches(seed=0)

    built = build_norm_hooks(_cfg(enabled, freeze), TinyDetector(), build_train_loader)
    assert [type(h) for h in built] == types
    if types:
        assert len(loader_cfgs) == 1 and loader_cfgs[0].DATALOADER.NUM_WORKERS == 0
        recalibrators = {id(h.recalibrator) for h in built}
        assert len(recalibrators) == 1 and next(iter(built)).recalibrator.num_iter == 4


def test_build_norm_hooks_builds_nothing_for_a_model_without_population_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    assert build_norm_hooks(_cfg(freeze=2), model, lambda cfg: pytest.fail("no loader needed")) == []


def test_built_hooks_use_the_eval_period_and_the_loader_across_recalibrations():
    model = TinyDetector()
    consumed = []

    def build_train_loader(cfg):
        return (consumed.append(i) or x for i, x in zip(itertools.count(), _batches(seed=0)))

    (hook,) = build_norm_hooks(_cfg(eval_period=2), model, build_train_loader)
    events = Events()
    _train(model, [hook], events, max_iter=4, eval_period=2)
    assert consumed == list(range(8))  # 2 recalibrations x NUM_ITER 4, one iterator
    assert bool(model.norm.recalibrated)


def test_build_norm_hooks_passes_the_recalibration_regime_and_puts_the_monitor_first():
    cfg = _cfg()
    cfg.merge_from_list(["D2NORM.PRECISE_BN.REGIME", "inference", "D2NORM.PRECISE_BN.MAX_PASSES", 3,
                         "D2NORM.MONITOR.ENABLED", True])
    monitor, recalibrate = build_norm_hooks(cfg, TinyDetector(), lambda cfg: _batches(seed=0))
    assert isinstance(monitor, NormStatsMonitor) and isinstance(recalibrate, RecalibrateNorms)
    recalibrator = recalibrate.recalibrator
    assert (recalibrator.regime, recalibrator.max_passes, recalibrator.record_shift) == ("inference", 3, True)


def test_recalibrator_records_how_far_each_recalibration_moved_the_statistics():
    model = TinyDetector()
    recalibrator = NormRecalibrator(model, _batches(seed=1), num_iter=2, record_shift=True)
    with EventStorage() as storage:
        recalibrator()  # the first recalibration of a PreciseBN has nothing to compare with
        assert "norm/other/recalibration_shift" not in storage.histories()
        recalibrator()  # other batches: the statistics move a little
        (shift, _), = storage.history("norm/other/recalibration_shift").values()
    assert 0 < shift < 1


def test_unknown_regime_names_the_config_key():
    with pytest.raises(ValueError, match="D2NORM.PRECISE_BN.REGIME"):
        NormRecalibrator(TinyDetector(), _batches(seed=1), num_iter=2, regime="eval")
