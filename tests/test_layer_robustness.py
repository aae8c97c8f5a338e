"""The d2norm layers under conditions a training run meets: non-finite values, half-precision
models, channels_last, torch.compile and activation checkpointing."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import d2norm
from d2norm import BatchRenorm2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d

# name -> layer settings; short schedules so a few steps cross every phase boundary
LAYERS = {
    "CBN-burnin": lambda c: CrossIterationBatchNorm2d(c, window=3, burnin_iters=100),
    "CBN": lambda c: CrossIterationBatchNorm2d(c, window=3),
    "MABN": lambda c: MovingAverageBatchNorm2d(c, buffer_size=2, warmup_iters=2, renorm_free_iters=3, rmax=1.5),
    "PreciseBN": lambda c: PreciseBatchNorm2d(c),
    "BRN": lambda c: BatchRenorm2d(c, rmax=1.5, dmax=0.5, warmup_iters=1, rmax_iters=3, dmax_iters=3),
}
STATEFUL = ["CBN-burnin", "CBN", "MABN", "BRN"]


def block(name, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), LAYERS[name](4))
    return d2norm.prepare_model(model, example_inputs=(torch.zeros(1, 3, 8, 8),))


def batch(step, scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(100 + step)
    return (torch.randn(2, 3, 6, 6, generator=generator) * scale + 0.5).to(dtype)


def sgd_step(model, optimizer, x):
    """One step; a non-finite loss skips the update, as a GradScaler does."""
    out = model(x)
    loss = (out.float() ** 2).mean() + out.float().mean()
    loss.backward()
    if torch.isfinite(loss):
        optimizer.step()
    optimizer.zero_grad()
    return out


def saved_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_states_equal(a, b, ignore=()):
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith(ignore):
            assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", STATEFUL)
def test_a_non_finite_batch_changes_no_state_and_training_continues_as_without_it(name, bad):
    model, twin = block(name), block(name)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin))
    for step in range(4):  # CBN past burn-in fills its window; MABN reaches its SMAS phase
        sgd_step(model, opt, batch(step))
        sgd_step(twin, twin_opt, batch(step))
    before = saved_state(model)
    poisoned = batch(99)
    poisoned[0, 1, 2, 3] = bad
    sgd_step(model, opt, poisoned)
    # the iteration counter of CBN counts the step (it is the schedule's clock), nothing else moves
    assert_states_equal(saved_state(model), before, ignore=("train_iterations",))
    assert int(model[1].nonfinite_skips) == 1
    for step in range(4, 9):  # across MABN's renorm boundary
        out = sgd_step(model, opt, batch(step))
        twin_out = sgd_step(twin, twin_opt, batch(step))
        torch.testing.assert_close(out, twin_out, rtol=0, atol=0)
    assert_states_equal(saved_state(model), saved_state(twin), ignore=("train_iterations",))
    assert int(twin[1].nonfinite_skips) == 0
    model.eval()
    assert torch.isfinite(model(batch(0))).all()


@pytest.mark.parametrize("name", ["CBN", "MABN", "PreciseBN", "BRN"])
def test_population_statistics_ignore_a_non_finite_recalibration_batch(name, caplog):
    model = block(name)
    batches = [batch(step) for step in range(3)]
    poisoned = batch(99)
    poisoned[1, 0, 0, 0] = float("nan")
    clean = copy.deepcopy(model)
    d2norm.recalibrate(clean, batches, num_iters=3)
    with caplog.at_level("WARNING", logger="d2norm.statistics.recalibration"):
        d2norm.recalibrate(model, [batches[0], poisoned, batches[1], batches[2]], num_iters=4)
    assert "non-finite" in caplog.text and "1 (1)" in caplog.text
    assert_states_equal(saved_state(model), saved_state(clean))


# ---------------------------------------------------------------------------------------------
# Dtypes and memory formats


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["CBN", "MABN", "PreciseBN", "BRN"])
def test_half_models_keep_float32_statistics(name, dtype):
    norm = block(name).to(dtype)[1]
    assert norm.weight.dtype == dtype
    floating = [b for b in norm.buffers() if b.is_floating_point()]
    assert floating and all(b.dtype == torch.float32 for b in floating)


@pytest.mark.parametrize("name", ["CBN", "MABN", "PreciseBN", "BRN"])
def test_bfloat16_models_train_with_activations_beyond_float16_range(name):
    model = block(name).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(6):
        sgd_step(model, opt, batch(step, scale=300.0, dtype=torch.bfloat16))
    norm = model[1]
    statistics = norm.buffer_x2 if name == "MABN" else norm.running_var
    assert torch.isfinite(statistics).all() and statistics.dtype == torch.float32


@pytest.mark.parametrize("name", ["MABN", "PreciseBN"])
def test_float16_statistics_do_not_overflow_at_large_activations(name):
    """χ = E[x²] at |x| ~ 300 is 9e4, beyond float16's 65504: float32 buffers hold it."""
    norm = LAYERS[name](4).half()
    x = (torch.randn(2, 4, 5, 5) * 300).half().requires_grad_()
    for _ in range(3):
        norm(x).float().sum().backward()
    assert torch.isfinite(norm.running_var).all()
    if name == "MABN":
        assert torch.isfinite(norm.buffer_x2).all() and float(norm.buffer_x2[1:].min()) > 5e4


def test_cbn_window_stays_valid_in_a_bfloat16_model_with_large_activations():
    model = block("CBN").to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in range(3):
        sgd_step(model, opt, batch(step, scale=1e3, dtype=torch.bfloat16))
    norm = model[1]
    assert int(norm.history_length) == 2
    assert torch.isfinite(norm.history_var).all() and norm.history_var.dtype == torch.float32


@pytest.mark.parametrize("name", ["CBN", "MABN", "PreciseBN", "BRN"])
def test_channels_last_models_train_like_contiguous_ones(name):
    model, twin = block(name), block(name).to(memory_format=torch.channels_last)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin))
    for step in range(5):
        out = sgd_step(model, opt, batch(step))
        twin_out = sgd_step(twin, twin_opt, batch(step).to(memory_format=torch.channels_last))
        torch.testing.assert_close(twin_out, out, rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-5, atol=1e-5)


def test_cbn_checkpoint_with_five_dimensional_derivative_buffer_loads():
    """Checkpoints written before the derivative buffer was stored flat load unchanged."""
    model = block("CBN")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        sgd_step(model, opt, batch(step))
    state = saved_state(model)
    old_layout = dict(state, **{"1.history_var_grad": state["1.history_var_grad"].view(2, 4, 3, 3, 3)})
    restored = block("CBN", seed=1)
    restored.load_state_dict(old_layout)
    assert_states_equal(saved_state(restored), state)


# ---------------------------------------------------------------------------------------------
# torch.compile and activation checkpointing


def compiled_matches_eager(name, backend, steps=7):
    eager, compiled = block(name), block(name)
    run = torch.compile(compiled, backend=backend)
    for step in range(steps):  # MABN: warm-up ends at 2, SMAS from 3, r clipped from 4
        x = batch(step, scale=1.0 + step)
        out, compiled_out = eager(x), run(x)
        torch.testing.assert_close(compiled_out, out, rtol=1e-5, atol=1e-5)
        (out ** 2).mean().backward()
        (compiled_out ** 2).mean().backward()
        for p, q in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
            p.grad = q.grad = None
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["CBN", "MABN", "PreciseBN", "BRN"])
def test_compiled_gradients_equal_eager_ones_across_mabn_boundaries(name):
    """``aot_eager_decomp_partition`` traces and partitions forward/backward as inductor does
    (min-cut recomputation), without generating code: the fast check."""
    compiled_matches_eager(name, "aot_eager_decomp_partition")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CBN", "MABN", "PreciseBN", "BRN"])
def test_inductor_gradients_equal_eager_ones_across_mabn_boundaries(name):
    compiled_matches_eager(name, "inductor")


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", ["CBN", "MABN", "BRN"])
def test_activation_checkpointing_around_a_stateful_layer_is_refused(name, use_reentrant):
    model = block(name)
    x = batch(0).requires_grad_()
    out = checkpoint(model, x, use_reentrant=use_reentrant)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        out.sum().backward()


def test_activation_checkpointing_of_precise_bn_matches_plain_training():
    model, twin = block("PreciseBN"), block("PreciseBN")
    x = batch(0).requires_grad_()
    checkpoint(model, x, use_reentrant=False).pow(2).sum().backward()
    twin(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
