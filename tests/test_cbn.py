"""CrossIterationBatchNorm2d: official trajectories, properties from the CBN paper (in d2norm's textbook
BN conventions) and the binding/state contract."""
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d

from d2norm.layers import CrossIterationBatchNorm2d
from d2norm.layers.cbn import conv_statistic_gradients, cross_iteration_batch_norm

REFERENCE = Path(__file__).resolve().parent / "reference"  # official-code trajectories (reference/README.md)
EPS = 1e-5
WINDOW_KEYS = (
    "train_iterations",
    "history_length",
    "history_next",
    "history_mean",
    "history_var",
    "history_mean_grad",
    "history_var_grad",
    "history_mean_grad_dot_weight",
    "history_var_grad_dot_weight",
)


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def per_channel(v):
    return v.view(1, -1, 1, 1)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(a, b, keys=None):
    assert a.keys() == b.keys()
    for key in keys or a:
        assert torch.equal(a[key], b[key]), key


def make_pair(cin=3, cout=4, window=4, burnin=0, seed=0, dtype=torch.float64, affine=True, **conv_kw):
    """A conv (3x3, padding 1, no bias unless overridden) and a bound CBN with non-trivial gamma/beta."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, **{"kernel_size": 3, "padding": 1, "bias": False, **conv_kw})
    norm = CrossIterationBatchNorm2d(cout, window=window, burnin_iters=burnin, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return conv.to(dtype), norm.to(dtype).bind_conv(conv)


def train_step(conv, norm, x, seed=0, lr=0.0):
    """conv -> norm -> loss = (y * R).sum() -> backward -> plain SGD with ``lr`` (reference scenario)."""
    x = x.detach().requires_grad_()
    y = norm(conv(x))
    y.backward(randn(*y.shape, seed=1000 + seed, dtype=y.dtype))
    out = {"y": y.detach(), "grad_x": x.grad, "grad_w": conv.weight.grad.clone()}
    if norm.affine:
        out.update(grad_gamma=norm.weight.grad.clone(), grad_beta=norm.bias.grad.clone())
    with torch.no_grad():
        for p in (*conv.parameters(), *norm.parameters()):
            p -= lr * p.grad
            p.grad = None
    return out


def normalized(c, mean, var, norm):
    """gamma * (c - mean) / sqrt(var + eps) + beta with per-channel statistics."""
    inv_std = per_channel(var + EPS).rsqrt()
    return per_channel(norm.weight) * (c - per_channel(mean)) * inv_std + per_channel(norm.bias)


def union_stats(outputs):
    """Mean and biased variance of the concatenation of conv outputs (per channel)."""
    var, mean = torch.var_mean(torch.cat(outputs), dim=(0, 2, 3), correction=0)
    return mean, var


# ---------------------------------------------------------------------------------------------
# Replay of the official CBN.py trajectories (reference/README.md: conv -> CBN -> (y*R).sum() -> SGD)


@pytest.mark.parametrize("case", ["cbn_w4", "cbn_w8"])
def test_replays_official_trajectory(case):
    settings = json.loads((REFERENCE / "cases.json").read_text())[case]
    ref = np.load(REFERENCE / f"{case}.npz")
    conv = nn.Conv2d(
        settings["Cin"], settings["Cout"], settings["kernel"],
        stride=settings["stride"], padding=settings["padding"], bias=False,
    ).double()
    norm = CrossIterationBatchNorm2d(
        settings["Cout"], window=settings["window"], burnin_iters=settings["burnin"],
        momentum=settings["momentum"], eps=settings["eps"],
    ).double().bind_conv(conv)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(ref["conv_weight0"]))
        norm.weight.copy_(torch.from_numpy(ref["gamma0"]))
        norm.bias.copy_(torch.from_numpy(ref["beta0"]))
    for t in range(settings["T"]):
        x = torch.from_numpy(ref["x"][t]).requires_grad_()
        y = norm(conv(x))
        (y * torch.from_numpy(ref["R"][t])).sum().backward()
        got = {
            "y": y, "grad_x": x.grad, "grad_conv_weight": conv.weight.grad, "grad_gamma": norm.weight.grad,
            "grad_beta": norm.bias.grad, "running_mean": norm.running_mean, "running_var": norm.running_var,
        }
        for key, value in got.items():
            expected = ref[key][t]
            error = np.abs(value.detach().numpy() - expected).max() / np.abs(expected).max()
            assert error <= 1e-7, f"step {t}: {key} relative error {error:.2e}"
        with torch.no_grad():
            for p in (conv.weight, norm.weight, norm.bias):
                p -= settings["lr"] * p.grad
                p.grad = None


# ---------------------------------------------------------------------------------------------
# Properties of the pooled, compensated statistics


def bn_twin(conv, norm):
    """An nn.BatchNorm2d (and conv copy) with the same parameters and statistics as ``norm``."""
    bn = nn.BatchNorm2d(norm.num_features, momentum=norm.momentum, eps=norm.eps).to(norm.running_mean.dtype)
    bn.load_state_dict({k: v for k, v in norm.state_dict().items() if k in bn.state_dict()})
    return copy.deepcopy(conv), bn


def test_window_one_is_batchnorm2d_exactly():
    conv, norm = make_pair(window=1)
    bn_conv, bn = bn_twin(conv, norm)
    for t in range(4):
        x = randn(2, 3, 5, 5, seed=t)
        got, expected = train_step(conv, norm, x, seed=t, lr=0.1), train_step(bn_conv, bn, x, seed=t, lr=0.1)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (t, key)
        assert_state_equal(state(bn), {k: v for k, v in state(norm).items() if k in bn.state_dict()})
    assert [tuple(t.shape) for t in norm.compensated_window()] == [(0, 4)] * 3  # no past to show


def test_burn_in_is_batchnorm2d_then_the_window_grows():
    conv, norm = make_pair(window=3, burnin=3)
    bn_conv, bn = bn_twin(conv, norm)
    lengths = []
    for t in range(6):
        x = randn(2, 3, 5, 5, seed=t)
        got, expected = train_step(conv, norm, x, seed=t, lr=0.1), train_step(bn_conv, bn, x, seed=t, lr=0.1)
        lengths.append(int(norm.history_length))
        if t < 3:  # burn-in: bit-identical forward, gradients and running statistics
            for key in expected:
                assert torch.equal(got[key], expected[key]), (t, key)
            assert torch.equal(norm.running_var, bn.running_var)
            assert torch.equal(norm.running_mean, bn.running_mean)
        elif t == 3:  # first pooled iteration, empty history: still BN up to rounding
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)
            # running statistics follow nn.BatchNorm2d (current batch) also while pooling
            torch.testing.assert_close(norm.running_var, bn.running_var, rtol=1e-12, atol=0)
        else:
            assert not torch.allclose(got["y"], expected["y"], atol=1e-3)
    assert lengths == [0, 0, 0, 1, 2, 2]
    assert int(norm.train_iterations) == 6


def test_a_loaded_state_restarts_the_schedule_from_its_counter():
    """The burn-in schedule runs on a host-side copy of the counter (tests/test_host_sync.py: no
    device read in a training step); loading a checkpoint taken during burn-in resumes burn-in
    (plain BN) from the loaded counter."""
    conv, norm = make_pair(window=3, burnin=2)
    early = {k: v.clone() for k, v in norm.state_dict().items()}
    for t in range(6):
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.1)
    assert norm.pools_window() and int(norm.train_iterations) == 6
    norm.load_state_dict(early)
    assert not norm.pools_window()
    train_step(conv, norm, randn(2, 3, 5, 5, seed=9), seed=9, lr=0.1)
    assert int(norm.history_length) == 0 and int(norm.train_iterations) == 1  # back in burn-in


def test_unchanged_weights_pool_the_union_of_equal_batches():
    conv, norm = make_pair(window=3)
    outputs = []
    for t in range(5):  # wraps the ring buffer (2 past slots)
        x = randn(2, 3, 4, 4, seed=t)
        with torch.no_grad():
            outputs.append(conv(x))
        got = train_step(conv, norm, x, seed=t, lr=0.0)["y"]
        mean, var = union_stats(outputs[-3:])
        torch.testing.assert_close(got, normalized(outputs[-1], mean, var, norm), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "conv_bias"])
def test_compensation_exact_for_mean_and_first_order_for_variance(bias):
    """Same input twice, weights changed by dW: the compensated mean is the mean under the new
    weights; the compensated variance falls short by q = mean_m <dW[c], p_m>^2."""
    conv, norm = make_pair(window=2, bias=bias)
    x = randn(2, 3, 5, 5, seed=0)
    train_step(conv, norm, x, lr=0.0)
    delta = 0.05 * randn(*conv.weight.shape, seed=1)
    with torch.no_grad():
        conv.weight += delta
        c = conv(x)
    y = train_step(conv, norm, x, lr=0.0)["y"]
    var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
    shortfall = F.conv2d(x, delta, padding=1).square().mean(dim=(0, 2, 3))
    assert (var - shortfall > 0).all()  # the compensated entry stays valid
    torch.testing.assert_close(y, normalized(c, mean, var - shortfall / 2, norm), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), norm.bias.detach(), rtol=0, atol=1e-12)


def test_entry_with_negative_compensated_variance_is_excluded_per_channel():
    """Flipping W[0] makes the first entry's compensated variance negative in channel 0 only:
    channel 0 pools k-1 batches, the other channels all k."""
    conv, norm = make_pair(window=3)
    xs = [randn(2, 3, 4, 4, seed=t) for t in range(3)]
    train_step(conv, norm, xs[0], lr=0.0)
    with torch.no_grad():
        before = conv(xs[0])
        conv.weight[0] *= -1
    train_step(conv, norm, xs[1], lr=0.0)
    y = train_step(conv, norm, xs[2], lr=0.0)["y"]
    with torch.no_grad():
        after = [conv(x) for x in xs[1:]]
    mean, var = union_stats(after)
    torch.testing.assert_close(y[:, :1], normalized(after[-1], mean, var, norm)[:, :1], rtol=1e-10, atol=1e-10)
    mean, var = union_stats([before] + after)
    torch.testing.assert_close(y[:, 1:], normalized(after[-1], mean, var, norm)[:, 1:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
def test_eval_is_the_per_channel_affine(affine):
    conv, norm = make_pair(window=3, affine=affine)
    for t in range(4):
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.1)
    norm.eval()
    before = state(norm)
    c = randn(3, 4, 6, 6, seed=9)
    scale, shift = norm.per_channel_affine()
    assert scale.shape == shift.shape == (4,)
    y = norm(c)
    torch.testing.assert_close(y, per_channel(scale) * c + per_channel(shift), rtol=1e-12, atol=1e-12)
    gamma, beta = (per_channel(norm.weight), per_channel(norm.bias)) if affine else (1.0, 0.0)
    textbook = gamma * (c - per_channel(norm.running_mean)) / per_channel(norm.running_var + EPS).sqrt() + beta
    torch.testing.assert_close(y, textbook, rtol=1e-12, atol=1e-12)
    assert_state_equal(before, state(norm))


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_with_fixed_history(affine):
    """Input (and affine) gradient = BN backward with statistic terms divided by the count."""
    past_mean, past_var = randn(3, 4, seed=1), randn(3, 4, seed=2).abs()
    past_valid = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)

    def f(x, *affine_params):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        weight, bias = affine_params or (None, None)
        return cross_iteration_batch_norm(x, weight, bias, mean, var, past_mean, past_var, past_valid, EPS)

    inputs = [randn(2, 4, 3, 3, seed=0).requires_grad_()]
    if affine:
        inputs += [randn(4, seed=3).requires_grad_(), randn(4, seed=4).requires_grad_()]
    assert torch.autograd.gradcheck(f, inputs)


CONVS = {
    "plain": dict(cin=4, cout=6, kernel_size=3, padding=1),
    "conv_bias": dict(cin=4, cout=6, kernel_size=3, padding=1, bias=True),
    "grouped": dict(cin=4, cout=6, kernel_size=3, padding=1, groups=2),
    "strided_dilated": dict(cin=3, cout=5, kernel_size=(3, 2), padding=2, stride=2, dilation=2),
    "depthwise": dict(cin=4, cout=4, kernel_size=3, padding=1, groups=4),
}


@pytest.mark.parametrize("geometry", CONVS.values(), ids=CONVS.keys())
def test_statistic_derivatives_equal_autograd(geometry):
    geometry = dict(geometry)
    cin, cout = geometry.pop("cin"), geometry.pop("cout")
    conv = nn.Conv2d(cin, cout, bias=geometry.pop("bias", False), **geometry).double()
    x = randn(2, cin, 7, 6, seed=0)
    c = conv(x)
    var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
    second_moment = c.square().mean(dim=(0, 2, 3))
    mean_patch, var_grad = conv_statistic_gradients(
        x, c.detach(), mean.detach(), conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    groups, cin_per_group = conv.groups, conv.weight.shape[1]
    assert mean_patch.shape == (cin, *conv.weight.shape[2:]) and var_grad.shape == conv.weight.shape
    # d mean_c / d W[c] is the mean patch of c's group, the same for every channel of the group
    group_patch = mean_patch.view(groups, cin_per_group, *mean_patch.shape[1:])
    per_output = group_patch.repeat_interleave(cout // groups, dim=0)
    (d_mean,) = torch.autograd.grad(mean.sum(), conv.weight, retain_graph=True)
    (d_var,) = torch.autograd.grad(var.sum(), conv.weight, retain_graph=True)
    (d_second,) = torch.autograd.grad(second_moment.sum(), conv.weight)
    torch.testing.assert_close(per_output, d_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var_grad, d_var, rtol=1e-12, atol=1e-12)
    # d nu/dW = d var/dW + 2 mean d mean/dW: the official stored derivative, recovered exactly
    torch.testing.assert_close(var_grad + 2 * mean.detach().view(-1, 1, 1, 1) * per_output, d_second)


@pytest.mark.parametrize("geometry", ["grouped", "strided_dilated"])
def test_pooling_through_grouped_and_strided_convs(geometry):
    """With unchanged weights the window pools the union of batches for any conv geometry."""
    conv, norm = make_pair(window=2, **CONVS[geometry])
    outputs = []
    for t in range(3):
        x = randn(2, conv.in_channels, 7, 6, seed=t)
        with torch.no_grad():
            outputs.append(conv(x))
        y = train_step(conv, norm, x, seed=t, lr=0.0)["y"]
    mean, var = union_stats(outputs[-2:])
    torch.testing.assert_close(y, normalized(outputs[-1], mean, var, norm), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# State: resume, dtype, no-grad forwards, bounded memory


@pytest.mark.parametrize("order", ["bind_then_load", "load_then_bind"])
def test_resume_continues_bit_identically(order):
    conv, norm = make_pair(window=4, burnin=2, seed=0)
    for t in range(7):  # burn-in, then a wrapped ring buffer
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.05)
    saved = state(nn.Sequential(conv, norm))

    fresh_conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    fresh_norm = CrossIterationBatchNorm2d(4, window=4, burnin_iters=2).double()
    fresh = nn.Sequential(fresh_conv, fresh_norm)
    if order == "bind_then_load":
        fresh_norm.bind_conv(fresh_conv)
        fresh.load_state_dict(saved)
    else:
        fresh.load_state_dict(saved)
        fresh_norm.bind_conv(fresh_conv)
    assert_state_equal(saved, state(fresh))

    x = randn(2, 3, 5, 5, seed=99)
    got = train_step(fresh_conv, fresh_norm, x, seed=99, lr=0.05)
    expected = train_step(conv, norm, x, seed=99, lr=0.05)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert_state_equal(state(nn.Sequential(conv, norm)), state(fresh))


def test_buffers_follow_to_float64():
    conv, norm = make_pair(window=3, dtype=torch.float32)
    for t in range(3):
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t, dtype=torch.float32), seed=t, lr=0.1)
    before = state(norm)
    conv.to(torch.float64), norm.to(torch.float64)
    for key, value in norm.state_dict().items():
        counters = ("num_batches_tracked", "train_iterations", "history_length", "history_next")
        expected = torch.long if key in counters else torch.float64
        assert value.dtype == expected, key
        torch.testing.assert_close(value, before[key].to(expected), rtol=0, atol=0)
    train_step(conv, norm, randn(2, 3, 5, 5, seed=5), lr=0.1)
    assert norm.history_var_grad.dtype == torch.float64 and int(norm.history_length) == 2


def test_bfloat16_input_keeps_float32_statistics():
    conv, norm = make_pair(window=3, dtype=torch.float32)
    conv32, norm32 = copy.deepcopy((conv, norm))
    for t in range(3):
        x = randn(2, 3, 5, 5, seed=t, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = train_step(conv, norm, x, seed=t)["y"]
        reference = train_step(conv32, norm32, x, seed=t)["y"]
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    for key in ("history_mean", "history_var", "history_mean_grad", "history_var_grad", "running_var"):
        assert getattr(norm, key).dtype == torch.float32, key
        torch.testing.assert_close(getattr(norm, key), getattr(norm32, key), rtol=0.05, atol=0.05)


def test_no_grad_and_frozen_forwards_use_the_batch_and_leave_the_window():
    conv, norm = make_pair(window=3)
    for t in range(2):
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.1)
    window = {k: v for k, v in state(norm).items() if k in WINDOW_KEYS}
    x = randn(2, 3, 5, 5, seed=7)
    with torch.no_grad():
        c = conv(x)
        rm, rv = norm.running_mean.clone(), norm.running_var.clone()
        under_no_grad = norm(c)
        expected = F.batch_norm(c, rm, rv, norm.weight, norm.bias, training=True, momentum=0.1, eps=EPS)
    torch.testing.assert_close(under_no_grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var, rv)  # updated as nn.BatchNorm2d does
    conv.weight.requires_grad_(False)  # a frozen conv: the norm input does not require grad
    norm(conv(x))
    assert norm._conv_call is None
    assert_state_equal(window, {k: v for k, v in state(norm).items() if k in WINDOW_KEYS})


def test_empty_batch_leaves_the_window():
    conv, norm = make_pair(window=3)
    train_step(conv, norm, randn(2, 3, 5, 5, seed=0), lr=0.1)
    window = {k: v for k, v in state(norm).items() if k in WINDOW_KEYS}
    y = norm(conv(torch.zeros(0, 3, 5, 5, dtype=torch.float64, requires_grad=True)))
    assert y.shape == (0, 4, 5, 5)
    assert_state_equal(window, {k: v for k, v in state(norm).items() if k in WINDOW_KEYS})


def test_state_size_is_bounded_and_conv_input_is_released():
    conv, norm = make_pair(window=4)
    shapes = {k: v.shape for k, v in norm.state_dict().items()}
    for t in range(20):
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.01)
        assert norm._conv_call is None
    assert {k: v.shape for k, v in norm.state_dict().items()} == shapes
    assert int(norm.history_length) == 3 and int(norm.train_iterations) == 20
    # per past iteration: one weight-sized derivative plus the input patch and four C-vectors
    assert norm.history_var_grad.numel() == 3 * conv.weight.numel()
    assert norm.history_mean_grad.numel() == 3 * conv.weight[0].numel()


# ---------------------------------------------------------------------------------------------
# Binding and module plumbing


def test_unbound_layer_asks_for_prepare_model():
    norm = CrossIterationBatchNorm2d(4, window=2).double()
    c = randn(2, 4, 3, 3, seed=0).requires_grad_()
    with pytest.raises(RuntimeError, match=r"prepare_model\(model\)"):
        norm(c)
    for window, burnin in ((1, 0), (2, 1)):  # window 1 and burn-in do not need the conv
        CrossIterationBatchNorm2d(4, window=window, burnin_iters=burnin).double()(c)
    with torch.no_grad():
        norm(c)  # nor do no-grad forwards


def test_binding_is_idempotent_and_keeps_names():
    conv, norm = nn.Conv2d(3, 4, 3, padding=1, bias=False), CrossIterationBatchNorm2d(4, window=3)
    model = nn.Sequential(conv, norm)
    names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    norm.bind_conv(conv)
    norm.bind_conv(conv)
    assert (list(model.state_dict()), [n for n, _ in model.named_parameters()]) == names
    assert len(conv._forward_pre_hooks) == 1 and list(norm.children()) == []
    model(torch.randn(2, 3, 5, 5, requires_grad=True))

    other = nn.Conv2d(3, 4, 1, bias=False)
    norm.bind_conv(other)
    assert len(conv._forward_pre_hooks) == 0 and norm.history_var_grad.shape == (2, 4, 3)
    assert int(norm.history_length) == 0  # a new conv shape empties the window
    with pytest.raises(RuntimeError, match="did not run"):
        model(torch.randn(2, 3, 5, 5, requires_grad=True))
    with pytest.raises(ValueError):
        norm.bind_conv(nn.Conv2d(3, 5, 1))


def test_deepcopy_and_pickle_keep_their_own_binding():
    conv, norm = make_pair(window=3)
    model = nn.Sequential(conv, norm)
    for t in range(2):
        train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.1)
    original = state(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_state_equal(original, state(clone))
        x = randn(2, 3, 5, 5, seed=5)
        got = train_step(clone[0], clone[1], x, seed=5, lr=0.1)
        assert_state_equal(original, state(model))  # the clone's conv feeds the clone's norm only
        assert int(clone[1].history_length) == 2
        twin = copy.deepcopy(model)
        expected = train_step(twin[0], twin[1], x, seed=5, lr=0.1)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_detectron2_conv_with_norm_trains_like_a_plain_pair():
    conv, norm = make_pair(window=3)
    d2_norm = copy.deepcopy(norm)
    d2_conv = D2Conv2d(3, 4, 3, padding=1, bias=False, norm=d2_norm).double()
    d2_conv.weight.data.copy_(conv.weight)
    d2_norm.bind_conv(d2_conv)
    for t in range(4):
        x = randn(2, 3, 5, 5, seed=t)
        expected = train_step(conv, norm, x, seed=t, lr=0.1)
        xg = x.clone().requires_grad_()
        y = d2_conv(xg)
        y.backward(randn(*y.shape, seed=1000 + t))
        torch.testing.assert_close(y, expected["y"], rtol=0, atol=0)
        torch.testing.assert_close(xg.grad, expected["grad_x"], rtol=0, atol=0)
        with torch.no_grad():
            for p in d2_conv.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    assert "norm.history_var_grad" in d2_conv.state_dict()


def test_loads_batchnorm2d_checkpoints_and_converts_to_frozen_bn():
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(2, 4, 3, 3))
    norm = CrossIterationBatchNorm2d(4, window=3)
    norm.load_state_dict(bn.state_dict())  # strict: window state starts empty
    assert torch.equal(norm.running_var, bn.running_var) and int(norm.history_length) == 0
    conv, bound = make_pair(window=3, dtype=torch.float32)
    train_step(conv, bound, torch.randn(2, 3, 5, 5))
    bound.load_state_dict(norm.state_dict())  # an empty window loads whatever the binding
    assert torch.equal(bound.running_var, bn.running_var) and int(bound.history_length) == 0
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(norm)
    assert isinstance(frozen, FrozenBatchNorm2d)
    assert torch.equal(frozen.running_mean, bn.running_mean)


def test_constructor_validates_and_repr_names_the_window():
    with pytest.raises(ValueError, match="window"):
        CrossIterationBatchNorm2d(4, window=0)
    with pytest.raises(ValueError, match="burnin_iters"):
        CrossIterationBatchNorm2d(4, burnin_iters=-1)
    assert "window=4, burnin_iters=2" in repr(CrossIterationBatchNorm2d(4, window=4, burnin_iters=2))
    assert isinstance(CrossIterationBatchNorm2d(4), nn.BatchNorm2d)


def test_naive_cbn_pools_the_stored_statistics_uncompensated():
    """rho = 0 (the official ``rho``; the paper's "naive CBN" baseline): after the weights moved,
    the past statistics enter the window as they were stored; rho = 1 moves them to the new weight."""
    windows = {}
    for rho in (0.0, 1.0):
        conv, norm = make_pair(window=3, seed=0)
        norm.rho = rho
        for t in range(3):
            train_step(conv, norm, randn(2, 3, 5, 5, seed=t), seed=t, lr=0.1)
        windows[rho] = norm.compensated_window()
        if rho == 0.0:
            past_mean, past_var, _ = windows[rho]
            torch.testing.assert_close(past_mean, norm.history_mean.to(past_mean.dtype))
            torch.testing.assert_close(past_var, norm.history_var.to(past_var.dtype))
    assert not torch.allclose(windows[0.0][0], windows[1.0][0])
    assert "rho=0.0" in repr(CrossIterationBatchNorm2d(4, rho=0.0))
    with pytest.raises(ValueError, match="rho"):
        CrossIterationBatchNorm2d(4, rho=-1.0)


def test_rho_comes_from_the_config_and_a_bad_value_names_the_key():
    from detectron2.config import get_cfg

    from d2norm.config import D2NormConfigError, add_d2norm_config, validate_d2norm_config
    from d2norm.modeling.registry import configured_factory

    cfg = get_cfg()
    add_d2norm_config(cfg)
    assert cfg.D2NORM.CBN.RHO == 1.0
    cfg.D2NORM.CBN.RHO = 0.0
    validate_d2norm_config(cfg)
    assert configured_factory("CBN", cfg.D2NORM)(8).rho == 0.0
    cfg.D2NORM.CBN.RHO = -0.5
    with pytest.raises(D2NormConfigError, match="D2NORM.CBN.RHO"):
        validate_d2norm_config(cfg)
