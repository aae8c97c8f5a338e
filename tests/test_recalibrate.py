"""d2norm.statistics.recalibration: exact pooled population statistics, model and state left as they were."""
import copy
import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils.events import EventStorage, get_event_storage

from d2norm.engine.launch import free_port
from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.modeling.binding import prepare_model
from d2norm.statistics.recalibration import population_norm_layers, recalibrate

NORM_TYPES = {
    "BN": lambda c: nn.BatchNorm2d(c),
    "PreciseBN": lambda c: PreciseBatchNorm2d(c),
    "CBN": lambda c: CrossIterationBatchNorm2d(c, window=3),
    "MABN": lambda c: MovingAverageBatchNorm2d(c, buffer_size=2, warmup_iters=2, renorm_free_iters=2),
}


def _model(*norms):
    """conv -> norm -> ReLU, once per norm name; channels 3 -> 4 -> 5 ..."""
    torch.manual_seed(0)
    layers, channels = [], 3
    for name in norms:
        conv = nn.Conv2d(channels, channels + 1, 3, padding=1)
        layers += [conv, NORM_TYPES[name](channels + 1), nn.ReLU()]
        channels += 1
    return prepare_model(nn.Sequential(*layers), example_inputs=torch.zeros(2, 3, 4, 4))


def _batches(seed=0, shapes=((2, 5, 5), (1, 7, 4), (3, 4, 6))):
    """Batches of different sizes N x H x W, so that pooling must weight them by N*H*W."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, h, w, generator=generator) * 2 + 1 for n, h, w in shapes]


def _exact_statistics(model, batches):
    """Per norm-layer name: mean, population variance and E[x^2] of its concatenated inputs.

    Computed on a copy of ``model`` whose norm inputs are captured, not accumulated."""
    model = copy.deepcopy(model)
    inputs = {}
    for name, layer in population_norm_layers(model):
        layer.register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    stats = {}
    for name, xs in inputs.items():
        x = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
        stats[name] = (x.mean(dim=1), x.var(dim=1, unbiased=False), x.square().mean(dim=1))
    return stats


def _assert_close(actual, expected):
    torch.testing.assert_close(actual.double().flatten(), expected, rtol=1e-5, atol=1e-5)


def _assert_population_statistics(model, expected, names=None):
    for name, layer in population_norm_layers(model):
        if names is not None and name not in names:
            continue
        mean, var, second_moment = expected[name]
        if isinstance(layer, MovingAverageBatchNorm2d):
            _assert_close(layer.running_var, second_moment)
        else:
            _assert_close(layer.running_mean, mean)
            _assert_close(layer.running_var, var)


def _train_steps(model, steps=4):
    """A few SGD steps, so that EMA statistics, CBN windows and MABN buffers are not at their init."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in _batches(seed=1, shapes=[(2, 5, 5)] * steps):
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()


def _state(model):
    return (
        {name: m.training for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


@pytest.mark.parametrize("norm", list(NORM_TYPES))
def test_statistics_equal_those_of_the_concatenated_feature_maps(norm):
    model = _model("BN", norm, norm)
    batches = _batches()
    expected = _exact_statistics(model, batches)
    assert set(expected) == {"1", "4", "7"}
    recalibrate(model, batches, len(batches))
    _assert_population_statistics(model, expected)
    # The test data can tell pooling from an average of per-batch means: sizes differ.
    with torch.no_grad():
        per_batch = torch.stack([model[0](b).double().mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert (per_batch - expected["1"][0]).abs().max() > 1e-3


def test_precise_bn_is_marked_recalibrated_and_evaluates_with_its_population():
    model = _model("PreciseBN")
    batches = _batches()
    recalibrate(model, batches, len(batches))
    layer = model[1]
    assert bool(layer.recalibrated)
    model.eval()
    x = batches[0]
    scale, shift = layer.per_channel_affine()
    expected = scale.view(1, -1, 1, 1) * model[0](x) + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(model[:2](x), expected)


@pytest.mark.parametrize("norm", list(NORM_TYPES))
def test_modes_parameters_and_every_other_buffer_are_restored(norm):
    model = _model("BN", norm, "BN")
    _train_steps(model)
    model[7].eval()  # a frozen norm inside a training model
    modes, before = _state(model)
    recalibrate(model, _batches(), 3)
    after_modes, after = _state(model)
    assert after_modes == modes
    set_here = {"1.running_mean", "1.running_var", "4.running_var", "4.recalibrated"}
    if norm != "MABN":
        set_here.add("4.running_mean")
    for key, value in after.items():
        if key not in set_here:
            assert torch.equal(value, before[key]), f"{key} changed"
    assert not torch.equal(after["4.running_var"], before["4.running_var"]), "statistics were not set"


def test_a_frozen_layer_keeps_its_statistics_and_is_used_as_frozen_downstream():
    model = _model("BN", "BN")
    _train_steps(model)
    model[1].eval()
    frozen_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    batches = _batches()
    expected = _exact_statistics(model, batches)  # the copy keeps layer 1 in eval mode as well
    recalibrate(model, batches, len(batches))
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, frozen_before[key])
    _assert_population_statistics(model, expected, names={"4"})


def test_a_model_in_eval_mode_is_recalibrated_as_a_whole_and_stays_in_eval():
    model = _model("BN", "PreciseBN")
    batches = _batches()
    expected = _exact_statistics(model, batches)  # training-mode forwards
    model.eval()
    recalibrate(model, batches, len(batches))
    assert not any(m.training for m in model.modules())
    _assert_population_statistics(model, expected)


def test_parameters_do_not_change_and_no_gradient_is_recorded():
    model = _model("BN", "PreciseBN")
    params = [p.detach().clone() for p in model.parameters()]
    recalibrate(model, _batches(), 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


def test_norms_of_frozen_stages_are_never_touched():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), MovingAverageBatchNorm2d(4),
                          nn.BatchNorm2d(4))
    model[2].frozen = True  # as prepare_model marks MABN layers with frozen parameters
    _, before = _state(model)
    recalibrate(model, _batches(), 3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != key.startswith("3.running"), key


class _Branching(nn.Module):
    """A norm used only for batches with more than one image (like a head without RoIs)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.BatchNorm2d(3)
        self.branch = PreciseBatchNorm2d(3)

    def forward(self, x):
        x = self.stem(x)
        return self.branch(x) if x.shape[0] > 1 else x


def test_a_layer_not_called_in_a_batch_gets_nothing_from_it():
    model = _Branching()
    batches = _batches()
    used = [b for b in batches if b.shape[0] > 1]
    expected = _exact_statistics(model, used)["branch"]
    recalibrate(model, batches, len(batches))
    torch.testing.assert_close(model.branch.running_mean.double(), expected[0])
    torch.testing.assert_close(model.branch.running_var.double(), expected[1])


def test_a_layer_never_called_keeps_its_statistics_and_stays_unrecalibrated():
    model = _Branching()
    recalibrate(model, _batches(shapes=[(1, 4, 4)] * 2), 2)
    assert not bool(model.branch.recalibrated)
    assert torch.equal(model.branch.running_var, torch.ones(3))


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.norm(x) + self.norm(2 * x)


def test_a_norm_called_twice_per_forward_is_an_error_and_leaves_the_model_untouched():
    model = _Shared()
    _, before = _state(model)
    with pytest.raises(RuntimeError, match="more than once.*PerLevelNorm"):
        recalibrate(model, _batches(), 3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.norm._forward_pre_hooks


def test_a_short_data_loader_is_an_error_and_leaves_the_model_untouched():
    model = _model("BN", "PreciseBN")
    model.eval()
    modes, before = _state(model)
    with pytest.raises(RuntimeError, match="needs 5 batches.*only 3"):
        recalibrate(model, _batches(), 5)
    after_modes, after = _state(model)
    assert after_modes == modes
    assert all(torch.equal(v, before[k]) for k, v in after.items())


def test_an_iterator_is_advanced_by_exactly_num_iters_and_progress_is_logged(caplog):
    batches = iter(_batches(shapes=[(1, 3, 3)] * 12))
    with caplog.at_level(logging.INFO, logger="d2norm.statistics.recalibration"):
        recalibrate(_model("BN"), batches, 10)
    assert len(list(batches)) == 2
    progress = [r.getMessage() for r in caplog.records if "batches." in r.getMessage()]
    assert progress == [f"Recalibration: {i}/10 batches." for i in (2, 4, 6, 8, 10)]


class _LoggingModel(nn.Module):
    """Like a detectron2 model in training mode: writes to the current EventStorage."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        get_event_storage().put_scalar("loss", 1.0)
        return self.norm(x)


def test_detectron2_style_models_run_and_their_events_are_discarded():
    with EventStorage() as storage:
        recalibrate(_LoggingModel(), _batches(), 3)
        assert "loss" not in storage.histories()


RANK_SHAPES = (((2, 5, 5), (1, 4, 4)), ((3, 6, 3), (1, 7, 7)))  # different data and sizes per rank


def _recalibrate_on_rank(rank, world_size, port, out_dir):
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world_size)
    try:
        model = _model("BN", "PreciseBN", "CBN", "MABN")
        batches = _batches(seed=10 + rank, shapes=RANK_SHAPES[rank])
        recalibrate(model, batches, len(batches))
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_identical_statistics_of_the_union_of_their_data(tmp_path):
    mp.spawn(_recalibrate_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between ranks"
    model = _model("BN", "PreciseBN", "CBN", "MABN")
    union = _batches(seed=10, shapes=RANK_SHAPES[0]) + _batches(seed=11, shapes=RANK_SHAPES[1])
    expected = _exact_statistics(model, union)
    model.load_state_dict(states[0])
    _assert_population_statistics(model, expected)


class _DetectronStyleModel(nn.Module):
    """Takes detectron2 batches (lists of dataset dicts) like GeneralizedRCNN."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, batch):
        return self.norm(torch.stack([d["image"].float() for d in batch]))


def test_a_test_loader_without_ground_truth_is_rejected_naming_the_training_loader():
    model = _DetectronStyleModel()
    before = copy.deepcopy(model.state_dict())
    test_batches = [[{"image": torch.rand(3, 4, 4), "height": 4, "width": 4, "image_id": 1}]]
    with pytest.raises(ValueError, match="build_detection_train_loader"):
        recalibrate(model, test_batches, 1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    train_batches = [[{"image": torch.rand(3, 4, 4), "instances": None}]]
    recalibrate(model, train_batches, 1)
