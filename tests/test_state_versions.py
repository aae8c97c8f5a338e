"""Versioned layer state (torch's ``_version`` / ``_load_from_state_dict`` convention): checkpoints
of every earlier layout load, migrations are chosen by the saved version, not guessed from shapes."""
import copy

import pytest
import torch
import torch.nn as nn

from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d


def trained_cbn():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    norm = CrossIterationBatchNorm2d(4, window=3).bind_conv(conv)
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
        norm(conv(x)).square().sum().backward()
    return conv, norm


def trained_mabn():
    torch.manual_seed(0)
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=1)
    for _ in range(3):
        layer(torch.randn(2, 4, 3, 3, requires_grad=True)).square().sum().backward()
    return layer


def with_version(state, prefix_version):
    state = copy.copy(state)
    state._metadata = copy.deepcopy(state._metadata)
    state._metadata[""]["version"] = prefix_version
    return state


def assert_same_state(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layers_save_their_own_versions():
    assert trained_cbn()[1].state_dict()._metadata[""]["version"] == CrossIterationBatchNorm2d._version == 3
    assert trained_mabn().state_dict()._metadata[""]["version"] == MovingAverageBatchNorm2d._version == 2


def test_cbn_version_2_checkpoints_load_also_with_the_unflattened_derivative_layout():
    conv, source = trained_cbn()
    saved = source.state_dict()
    # as written before CBN had its own version: nn.BatchNorm2d's version 2, the 3-D layout ...
    target = CrossIterationBatchNorm2d(4, window=3).bind_conv(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    target.load_state_dict(with_version(saved, 2))
    assert_same_state(target.state_dict(), saved)
    # ... or, earlier still, the derivative of the variance kept in the conv weight's 5-D shape
    old = with_version(saved, 2)
    old["history_var_grad"] = saved["history_var_grad"].reshape(2, 4, 3, 3, 3)
    target = CrossIterationBatchNorm2d(4, window=3).bind_conv(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    target.load_state_dict(old)
    assert_same_state(target.state_dict(), saved)


def test_cbn_version_3_state_is_loaded_as_saved_without_layout_guessing():
    _, source = trained_cbn()
    bad = source.state_dict()
    bad["history_var_grad"] = bad["history_var_grad"].reshape(2, 4, 3, 3, 3)  # not a version-3 layout
    _, target = trained_cbn()
    with pytest.raises(RuntimeError, match="history_var_grad"):
        target.load_state_dict(bad)


def test_mabn_version_1_checkpoints_and_the_official_layout_load():
    source = trained_mabn()
    saved = source.state_dict()
    target = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=1)
    target.load_state_dict(with_version(saved, 1))  # d2norm before MABN had its own version
    assert_same_state(target.state_dict(), saved)
    official = with_version(saved, 1)
    official["running_var"], official["iters"] = saved["running_var"].view(1, 4, 1, 1), saved["iters"].view(1)
    target = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=1)
    target.load_state_dict(official)
    assert_same_state(target.state_dict(), saved)
    bad = copy.copy(saved)
    bad["running_var"] = saved["running_var"].view(1, 4, 1, 1)  # not a version-2 layout
    with pytest.raises(RuntimeError, match="running_var"):
        MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=1).load_state_dict(bad)


def test_a_checkpoint_written_by_an_earlier_version_continues_exactly():
    """``tests/reference/checkpoint_b7c75ad.pt`` was written by d2norm at commit b7c75ad (command in
    ``tests/reference/write_checkpoint.py``): a model with CBN, MABN after a weight-centralised conv
    and a recalibrated PreciseBN. Loaded today, it evaluates and takes its next training step as the
    writing version did."""
    import sys
    from pathlib import Path

    reference = Path(__file__).parent / "reference"
    sys.path.insert(0, str(reference))
    try:
        from write_checkpoint import batch, build, train_step
    finally:
        sys.path.remove(str(reference))
    saved = torch.load(reference / "checkpoint_b7c75ad.pt", weights_only=True)
    model = build()
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer.load_state_dict(saved["optimizer"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch(200)), saved["eval_output"], rtol=0, atol=1e-12)
    model.train()
    torch.testing.assert_close(train_step(model, optimizer, 6), saved["next_output"], rtol=0, atol=1e-12)
    for key, value in saved["next_state"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-12, msg=key)
