"""MovingAverageBatchNorm2d and weight centralisation: official trajectory and properties from the MABN paper."""
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch.func import functional_call

from d2norm.layers import MovingAverageBatchNorm2d
from d2norm.layers.weight_centralization import (
    centralize_conv_weight,
    centralized_weight,
    effective_conv_weight,
    is_weight_centralized,
)

REFERENCE = Path(__file__).resolve().parent / "reference"  # official-code trajectories (reference/README.md)
EPS = 1e-5


def second_moment(x):
    return x.square().mean(dim=(0, 2, 3))


def per_channel(v):
    return v.view(1, -1, 1, 1)


def batch_normalised(layer, x):
    """γ·x/√(mean_{N,H,W} x² + eps) + β: the warm-up (batch statistics) formula."""
    scale = layer.weight / torch.sqrt(second_moment(x) + EPS)
    return per_channel(scale) * x + per_channel(layer.bias)


def state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_step(layer, x, seed=0):
    """One stateful training forward and backward with a fixed random upstream gradient."""
    x = x.detach().requires_grad_()
    out = layer(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(upstream)
    return out, x.grad


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Replay of the official MABN.py trajectory (reference/README.md: 1030 steps, m=4, warm-up 50,
# r clipped from step 1001, weight-centralised conv, plain SGD), float64.
# ---------------------------------------------------------------------------------------------
RECORDED = ("y", "grad_x", "grad_conv_weight", "grad_gamma", "grad_beta", "running_var")


@pytest.fixture(scope="module")
def replay():
    case = json.loads((REFERENCE / "cases.json").read_text())["mabn_b4"]
    ref = np.load(REFERENCE / "mabn_b4.npz")
    conv = nn.Conv2d(case["Cin"], case["Cout"], case["kernel"], padding=case["padding"], bias=False).double()
    centralize_conv_weight(conv)
    norm = MovingAverageBatchNorm2d(
        case["Cout"], buffer_size=case["buffer_size"], warmup_iters=case["warmup_iters"],
        renorm_free_iters=case["renorm_free_iters"], rmax=case["rmax"], ema_decay=case["momentum"],
        eps=case["eps"],
    ).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(ref["conv_weight0"]))
        norm.weight.copy_(torch.from_numpy(ref["gamma0"]))
        norm.bias.copy_(torch.from_numpy(ref["beta0"]))
    params = [conv.weight, norm.weight, norm.bias]
    xs, rs = torch.from_numpy(ref["x"]), torch.from_numpy(ref["R"])
    ours = {name: [] for name in RECORDED}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1030 tiny steps: intra-op threads only add overhead (20x on 2 busy cores)
    try:
        for t in range(case["T"]):
            x = xs[t].clone().requires_grad_()
            y = norm(conv(x))
            grads = torch.autograd.grad((y * rs[t]).sum(), [x] + params)
            with torch.no_grad():
                for p, g in zip(params, grads[1:]):
                    p.sub_(case["lr"] * g)
            for name, value in zip(RECORDED, (y, *grads, norm.running_var)):
                ours[name].append(value.detach().clone())
    finally:
        torch.set_num_threads(threads)
    norm.eval()
    with torch.no_grad():
        y_eval = norm(conv(torch.from_numpy(ref["x_eval"])))
    ours = {name: torch.stack(values).numpy() for name, values in ours.items()}
    ours.update(y_eval=y_eval.numpy(), conv_weight_final=conv.weight.detach().numpy())
    return ours, ref, case


def max_relative_error_per_step(ours, ref):
    steps = ref.shape[0]
    diff = np.abs(ours - ref).reshape(steps, -1).max(axis=1)
    return diff / np.abs(ref).reshape(steps, -1).max(axis=1)


@pytest.mark.parametrize("name", RECORDED)
def test_replays_official_trajectory_every_step(replay, name):
    ours, ref, case = replay
    assert ours[name].shape == ref[name].shape
    errors = max_relative_error_per_step(ours[name], ref[name])
    assert errors.max() <= 1e-7, f"{name}: first step above 1e-7 is {int(np.argmax(errors > 1e-7))}"


@pytest.mark.parametrize("name", ["y_eval", "conv_weight_final"])
def test_replays_official_eval_output_and_final_weight(replay, name):
    ours, ref, _ = replay
    assert np.abs(ours[name] - ref[name]).max() <= 1e-7 * np.abs(ref[name]).max()


# ---------------------------------------------------------------------------------------------
# Properties from the MABN paper
# ---------------------------------------------------------------------------------------------
def test_warmup_forward_normalises_by_the_second_moment_without_centring():
    layer = MovingAverageBatchNorm2d(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = randn(2, 3, 4, 5, seed=0) + 0.7
    out = layer(x.requires_grad_())
    torch.testing.assert_close(out, batch_normalised(layer, x), rtol=0, atol=1e-12)

    constant = torch.full((2, 3, 4, 4), -3.0, dtype=torch.float64, requires_grad=True)
    out = layer(constant)
    expected = -3.0 / np.sqrt(9.0 + EPS) * layer.weight + layer.bias  # ≈ γ·sign(a) + β, not β
    torch.testing.assert_close(out[0, :, 0, 0], expected, rtol=0, atol=1e-12)


def test_warmup_backward_equals_autograd_of_second_moment_normalisation():
    layer = MovingAverageBatchNorm2d(3, warmup_iters=10**9).double()  # batch statistics for good
    gamma = randn(3, seed=1).requires_grad_()
    beta = randn(3, seed=2).requires_grad_()
    x = randn(2, 3, 3, 4, seed=3).requires_grad_()

    def mabn(x, gamma, beta):
        return functional_call(layer, {"weight": gamma, "bias": beta}, (x,))

    def reference(x, gamma, beta):
        return per_channel(gamma) * x / torch.sqrt(per_channel(second_moment(x)) + EPS) + per_channel(beta)

    upstream = randn(2, 3, 3, 4, seed=4)
    ours = torch.autograd.grad(mabn(x, gamma, beta), (x, gamma, beta), upstream)
    exact = torch.autograd.grad(reference(x, gamma, beta), (x, gamma, beta), upstream)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(mabn, (x, gamma, beta))


@pytest.mark.parametrize("buffer_size, warmup_iters, first_smas", [(4, 10, 10), (4, 2, 5), (16, 100, 100)])
def test_smas_switch_timing_with_constant_inputs(buffer_size, warmup_iters, first_smas):
    """x ≡ a_t gives χ_t = a_t²; SMAS (mean of the last m χ) from step max(m+1, warmup) on."""
    layer = MovingAverageBatchNorm2d(2, buffer_size=buffer_size, warmup_iters=warmup_iters).double()
    a = 0.5 + torch.rand(first_smas + buffer_size + 3, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    for t in range(1, len(a)):
        x = torch.full((2, 2, 3, 3), float(a[t]), dtype=torch.float64, requires_grad=True)
        out = layer(x)
        window = a[max(1, t - buffer_size + 1): t + 1] ** 2
        var = window.mean() if t >= first_smas else a[t] ** 2
        assert t < first_smas or len(window) == buffer_size
        torch.testing.assert_close(out[0, 0, 0, 0], a[t] / torch.sqrt(var + EPS), rtol=0, atol=1e-12)
        assert int(layer.iters) == t
        torch.testing.assert_close(layer.buffer_x2[t % buffer_size], (a[t] ** 2).expand(2),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("warmup_iters, renorm_free_iters, first_clipped", [(100, 1000, 1001), (20, 5, 21)])
def test_renorm_factor_is_one_then_clipped(warmup_iters, renorm_free_iters, first_clipped):
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=warmup_iters,
                                     renorm_free_iters=renorm_free_iters).double()
    x = randn(2, 4, 3, 3, seed=0)
    std = per_channel(torch.sqrt(second_moment(x) + EPS))

    def step_at(t, running_var):
        with torch.no_grad():
            layer.iters.fill_(t - 1)
            layer.buffer_x2.copy_(second_moment(x).expand(2, 4))  # so that var = χ in SMAS mode too
            layer.running_var.copy_(running_var)
        return layer(x.clone().requires_grad_()).detach()

    tiny, huge = torch.full((4,), 1e-8, dtype=torch.float64), torch.full((4,), 1e8, dtype=torch.float64)
    torch.testing.assert_close(step_at(first_clipped - 1, tiny), x / std, rtol=1e-12, atol=0)
    torch.testing.assert_close(step_at(first_clipped, tiny), 5.0 * x / std, rtol=1e-12, atol=0)
    torch.testing.assert_close(step_at(first_clipped, huge), x / (5.0 * std), rtol=1e-12, atol=0)

    # Unclipped r: the training output is the eval map with running_var before the step (EMAS).
    moderate = 1.7 * second_moment(x) + 0.01
    eval_map = x / torch.sqrt(per_channel(moderate) + EPS)
    torch.testing.assert_close(step_at(first_clipped + 1, moderate), eval_map, rtol=1e-12, atol=0)


@pytest.mark.parametrize("old_gradient_statistics", ["kept", "zeroed"])
def test_smas_backward_replaces_psi_by_its_moving_average(old_gradient_statistics):
    m = 4
    layer = MovingAverageBatchNorm2d(3, buffer_size=m, warmup_iters=0).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
        layer.bias.copy_(torch.tensor([0.2, 0.0, -1.0]))
    for t in range(6):
        train_step(layer, randn(2, 3, 4, 4, seed=10 + t) + 0.3, seed=20 + t)
    if old_gradient_statistics == "zeroed":
        layer.buffer_gz.zero_()
    slot = (int(layer.iters) + 1) % m
    others = [i for i in range(m) if i != slot]
    old_chi, old_psi = layer.buffer_x2[others].clone(), layer.buffer_gz[others].clone()

    x = (randn(2, 3, 4, 4, seed=30) + 0.3).requires_grad_()
    upstream = randn(2, 3, 4, 4, seed=31)
    ours = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), upstream)

    # Exact gradient of γ·x/√((χ_t + Σ_old χ)/m + eps) + β with the old χ constant (r = 1).
    gamma, beta = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    x_ref = x.detach().requires_grad_()
    var = (second_moment(x_ref) + old_chi.sum(dim=0)) / m
    out = per_channel(gamma) * x_ref / torch.sqrt(per_channel(var) + EPS) + per_channel(beta)
    exact = torch.autograd.grad(out, (x_ref, gamma, beta), upstream)

    z = x.detach() / torch.sqrt(per_channel(var.detach()) + EPS)
    correction = -z * per_channel(old_psi.sum(dim=0) / m) / torch.sqrt(per_channel(var.detach()) + EPS)
    torch.testing.assert_close(ours[0], exact[0] + correction, rtol=0, atol=1e-10)
    if old_gradient_statistics == "zeroed":
        torch.testing.assert_close(ours[0], exact[0], rtol=0, atol=1e-10)
    else:
        assert correction.abs().max() > 1e-3  # the SMAS of Ψ really differs from the batch Ψ
    for a, b in zip(ours[1:], exact[1:]):  # affine gradients: Σ G·ŷ and Σ G
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_running_var_is_an_ema_of_the_normalising_statistic():
    m, decay = 2, 0.9
    layer = MovingAverageBatchNorm2d(3, buffer_size=m, warmup_iters=4, ema_decay=decay).double()
    expected = torch.ones(3, dtype=torch.float64)
    chis = []
    for t in range(1, 9):
        x = randn(2, 3, 3, 3, seed=t) * t
        chis.append(second_moment(x))
        train_step(layer, x, seed=t)
        var = chis[-1] if t < 4 else torch.stack(chis[-m:]).mean(dim=0)
        expected = decay * expected + (1 - decay) * var
        torch.testing.assert_close(layer.running_var, expected, rtol=1e-14, atol=0)

    default = MovingAverageBatchNorm2d(3).double()
    x = randn(2, 3, 3, 3, seed=0)
    train_step(default, x)
    torch.testing.assert_close(default.running_var, 0.98 + 0.02 * second_moment(x), rtol=1e-14, atol=0)


def test_forward_without_backward_updates_forward_state_only():
    layer = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=0).double()
    train_step(layer, randn(2, 3, 3, 3, seed=0))
    before = state(layer)
    layer(randn(2, 3, 3, 3, seed=1).requires_grad_())
    after = state(layer)
    assert int(after["iters"]) == int(before["iters"]) + 1
    assert not torch.equal(after["buffer_x2"], before["buffer_x2"])
    assert not torch.equal(after["running_var"], before["running_var"])
    assert torch.equal(after["buffer_gz"], before["buffer_gz"])


# ---------------------------------------------------------------------------------------------
# Weight centralisation
# ---------------------------------------------------------------------------------------------
def make_conv(kind, **kwargs):
    torch.manual_seed(0)
    if kind == "torch":
        return nn.Conv2d(3, 4, 3, bias=False, **kwargs).double()
    return D2Conv2d(3, 4, 3, bias=False, **kwargs).double()


@pytest.mark.parametrize("kind", ["torch", "detectron2"])
def test_centralized_conv_uses_zero_mean_filters_and_gets_zero_mean_gradients(kind):
    conv = make_conv(kind, padding=1)
    plain_state = {k: v.clone() for k, v in conv.state_dict().items()}
    base = type(conv)
    assert centralize_conv_weight(conv) is conv
    centralize_conv_weight(conv)  # idempotent
    assert is_weight_centralized(conv) and isinstance(conv, base) and type(conv).__mro__[2] is base
    assert [name for name, _ in conv.named_parameters()] == ["weight"]
    assert isinstance(conv.weight, nn.Parameter)  # outside forward: the trainable Parameter

    conv.load_state_dict(plain_state)  # an uncentred checkpoint loads; centring happens in forward
    effective = effective_conv_weight(conv)
    assert effective.mean(dim=(1, 2, 3)).abs().max() < 1e-15
    assert effective.abs().max() > 0.1

    x = randn(2, 3, 5, 5, seed=0)
    out = conv(x)
    w = plain_state["weight"]
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, F.conv2d(x, centred, padding=1), rtol=0, atol=1e-12)
    out.backward(randn(*out.shape, seed=1))
    assert conv.weight.grad.mean(dim=(1, 2, 3)).abs().max() < 1e-14
    assert conv.weight.grad.abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["torch", "detectron2"])
def test_centralized_conv_maps_spatially_constant_input_to_zero(kind):
    conv = centralize_conv_weight(make_conv(kind))
    out = conv(torch.full((1, 3, 5, 5), 2.5, dtype=torch.float64))
    assert out.abs().max() < 1e-13
    assert not torch.equal(effective_conv_weight(conv), conv.weight)


def test_centralized_conv_then_mabn_is_invariant_to_per_channel_weight_offsets():
    outputs = []
    for offset in (0.0, 1.0):
        torch.manual_seed(0)
        conv = D2Conv2d(3, 4, 3, padding=1, bias=False, norm=MovingAverageBatchNorm2d(4)).double()
        centralize_conv_weight(conv)
        with torch.no_grad():
            per_filter = torch.tensor([3.0, -2.0, 0.5, 7.0], dtype=torch.float64).view(4, 1, 1, 1)
            conv.weight.add_(offset * per_filter)
        x = randn(2, 3, 5, 5, seed=2).requires_grad_()
        out = conv(x)
        grads = torch.autograd.grad(out, (x, conv.weight), randn(*out.shape, seed=3))
        outputs.append((out, *grads, conv.norm.running_var.clone()))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_centralized_conv_survives_deepcopy_and_whole_model_pickling():
    conv = centralize_conv_weight(make_conv("detectron2", norm=MovingAverageBatchNorm2d(4).double()))
    conv.eval()
    blob = io.BytesIO()
    torch.save(nn.Sequential(conv), blob)
    blob.seek(0)
    x = randn(2, 3, 5, 5, seed=0)
    for clone in (copy.deepcopy(conv), torch.load(blob, weights_only=False)[0]):
        assert type(clone) is type(conv) and is_weight_centralized(clone)
        assert clone.weight is not conv.weight
        assert torch.equal(clone(x), conv(x))


def test_centralized_weight_is_idempotent_and_rejects_non_convs():
    w = randn(4, 3, 3, 3, seed=0)
    once = centralized_weight(w)
    torch.testing.assert_close(centralized_weight(once), once, rtol=0, atol=1e-15)
    with pytest.raises(TypeError):
        centralize_conv_weight(nn.Linear(3, 4))


@pytest.mark.parametrize("groups", [1, 2])
def test_centralized_transposed_conv_maps_a_constant_input_to_zero_mean_channels(groups):
    """The zero-mean-filter property of weight centralisation, for a (grouped) transposed conv."""
    torch.manual_seed(0)
    conv = centralize_conv_weight(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=groups, bias=False).double())
    x = torch.ones(1, 4, 3, 3, dtype=torch.float64) * torch.tensor([1.0, 1.0, 2.0, 2.0]).double().view(1, 4, 1, 1)
    with torch.no_grad():
        y = conv(x)  # each group sees a constant input (1 for the first group's channels, 2 for the second's)
        per_group_constant = conv(torch.ones(1, 4, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(per_group_constant.mean(dim=(0, 2, 3)), torch.zeros(6, dtype=torch.float64))
    if groups == 2:
        torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(6, dtype=torch.float64))
    assert conv.weight.grad is None and not torch.allclose(conv.weight, centralized_weight(conv.weight, True, groups))


# ---------------------------------------------------------------------------------------------
# State: checkpoints, empty inputs, mixed precision, no-grad and eval forwards
# ---------------------------------------------------------------------------------------------
def make_conv_mabn():
    torch.manual_seed(0)
    norm = MovingAverageBatchNorm2d(4, buffer_size=3, warmup_iters=4, renorm_free_iters=6)
    return centralize_conv_weight(D2Conv2d(3, 4, 3, padding=1, bias=False, norm=norm))


def sgd_step(model, x, seed):
    out, _ = train_step(model, x, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.05 * p.grad)
            p.grad = None
    return out


def test_save_load_continue_is_bit_identical():
    original = make_conv_mabn()
    for t in range(8):  # through warm-up, SMAS and clipped renormalisation
        sgd_step(original, randn(2, 3, 5, 5, seed=t, dtype=torch.float32), seed=t)
    buffers = {"norm.running_var", "norm.iters", "norm.buffer_x2", "norm.buffer_gz"}
    assert buffers <= set(original.state_dict())
    blob = io.BytesIO()
    torch.save(original.state_dict(), blob)
    blob.seek(0)
    resumed = make_conv_mabn()
    resumed.load_state_dict(torch.load(blob), strict=True)
    assert_state_equal(state(original), state(resumed))
    for t in range(8, 12):
        x = randn(2, 3, 5, 5, seed=t, dtype=torch.float32)
        a, b = sgd_step(original, x, seed=t), sgd_step(resumed, x, seed=t)
        assert torch.equal(a, b)
        assert_state_equal(state(original), state(resumed))


@pytest.mark.parametrize("loader", ["load_state_dict", "DetectionCheckpointer"])
def test_checkpoint_of_another_buffer_size_restarts_the_moving_averages(loader, tmp_path, caplog):
    """Ring buffers of another m cannot continue: running_var loads, iters and buffers restart
    together (DetectionCheckpointer drops the mismatched buffers, load_state_dict would refuse them)."""
    trained = make_conv_mabn()
    for t in range(8):
        sgd_step(trained, randn(2, 3, 5, 5, seed=t, dtype=torch.float32), seed=t)
    norm = MovingAverageBatchNorm2d(4, buffer_size=5, warmup_iters=4, renorm_free_iters=6)
    resized = centralize_conv_weight(D2Conv2d(3, 4, 3, padding=1, bias=False, norm=norm))
    with caplog.at_level(logging.INFO, logger="d2norm.layers.mabn"):
        if loader == "load_state_dict":
            resized.load_state_dict(trained.state_dict())
        else:
            torch.save({"model": trained.state_dict()}, tmp_path / "m.pth")
            DetectionCheckpointer(resized).load(str(tmp_path / "m.pth"))
    assert "buffer_size 5" in caplog.text and "iters = 0" in caplog.text
    assert torch.equal(norm.running_var, trained.norm.running_var)
    assert int(norm.iters) == 0 and not norm.buffer_x2.any() and not norm.buffer_gz.any()
    assert norm.buffer_x2.shape == (5, 4)


@pytest.mark.parametrize("source", ["BatchNorm2d", "FrozenBatchNorm2d"])
def test_batchnorm_state_dict_loads_as_second_moment(source, caplog):
    bn = nn.BatchNorm2d(4) if source == "BatchNorm2d" else FrozenBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.25, 2.0, 1.0]))
    model = nn.Sequential(nn.Identity(), MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0))
    for t in range(4):
        train_step(model, randn(2, 4, 3, 3, seed=t, dtype=torch.float32), seed=t)
    assert int(model[1].iters) == 4 and model[1].buffer_gz.abs().sum() > 0

    with caplog.at_level(logging.INFO, logger="d2norm.layers.mabn"):
        model.load_state_dict(nn.Sequential(nn.Identity(), bn).state_dict(), strict=True)
    notes = [r for r in caplog.records if r.name == "d2norm.layers.mabn"]
    assert len(notes) == 1 and "running_mean**2" in notes[0].getMessage()
    layer = model[1]
    torch.testing.assert_close(layer.running_var, bn.running_var + bn.running_mean ** 2)
    assert torch.equal(layer.weight.detach(), bn.weight) and torch.equal(layer.bias.detach(), bn.bias)
    assert int(layer.iters) == 0 and not layer.buffer_x2.any() and not layer.buffer_gz.any()


def test_official_checkpoint_layout_loads():
    source = MovingAverageBatchNorm2d(4, buffer_size=2)
    train_step(source, randn(2, 4, 3, 3, seed=0, dtype=torch.float32))
    official = dict(source.state_dict())
    official["running_var"] = official["running_var"].view(1, 4, 1, 1)
    official["iters"] = official["iters"].view(1)
    target = MovingAverageBatchNorm2d(4, buffer_size=2)
    target.load_state_dict(official, strict=True)
    assert_state_equal(state(target), state(source))


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 4, 0, 5)])
def test_empty_input_gives_empty_connected_output_and_leaves_state_untouched(shape):
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0)
    for t in range(3):
        train_step(layer, randn(2, 4, 3, 3, seed=t, dtype=torch.float32), seed=t)
    before = state(layer)
    x = torch.zeros(shape, requires_grad=True)
    out = layer(x)
    assert out.shape == shape and out.requires_grad
    out.sum().backward()
    assert x.grad.shape == shape and layer.weight.grad is not None
    assert_state_equal(state(layer), before)
    assert all(torch.isfinite(v.float()).all() for v in state(layer).values())


def test_autocast_bfloat16_keeps_float32_statistics():
    conv = centralize_conv_weight(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0)
    x = randn(2, 3, 6, 6, seed=0, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        out = layer(features)
    assert features.dtype == out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == conv.weight.grad.dtype == torch.float32
    for name in ("running_var", "buffer_x2", "buffer_gz"):
        assert getattr(layer, name).dtype == torch.float32
    chi = second_moment(features.detach().float())  # the bfloat16 values, squared in float32
    torch.testing.assert_close(layer.buffer_x2[1], chi, rtol=1e-6, atol=0)


def test_float16_input_beyond_half_range_squared_stays_finite():
    layer = MovingAverageBatchNorm2d(4)
    x = (300.0 * randn(2, 4, 4, 4, seed=0, dtype=torch.float32)).half().requires_grad_()  # x² > 65504
    out = layer(x)
    out.backward(torch.ones_like(out))
    assert out.dtype == x.grad.dtype == torch.float16
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(layer.buffer_x2[1], second_moment(x.detach().float()), rtol=1e-6, atol=0)
    expected = x.detach().float() / torch.sqrt(per_channel(layer.buffer_x2[1]) + EPS)
    torch.testing.assert_close(out.float(), expected, rtol=1e-3, atol=1e-3)
    for buffer in (layer.running_var, layer.buffer_gz):
        assert buffer.dtype == torch.float32 and torch.isfinite(buffer).all()


def test_non_finite_gradient_statistic_is_not_buffered():
    """A loss-scaler overflow step must not poison the next m iterations' backward."""
    layer = MovingAverageBatchNorm2d(2, buffer_size=2, warmup_iters=0)
    for t in range(3):
        train_step(layer, randn(2, 2, 3, 3, seed=t, dtype=torch.float32), seed=t)
    slot = (int(layer.iters) + 1) % 2
    previous = layer.buffer_gz[slot].clone()
    x = randn(2, 2, 3, 3, seed=5, dtype=torch.float32).requires_grad_()
    upstream = torch.ones(2, 2, 3, 3)
    upstream[0, 0, 0, 0] = float("inf")
    layer(x).backward(upstream)
    assert layer.buffer_gz[slot, 0] == previous[0]
    assert layer.buffer_gz[slot, 1] != previous[1]
    assert torch.isfinite(layer.buffer_gz).all()


@pytest.mark.parametrize("mode", ["no_grad", "input_without_grad"])
def test_training_forward_without_autograd_uses_batch_statistics_and_leaves_state_untouched(mode):
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0).double()
    for t in range(3):
        train_step(layer, randn(2, 4, 3, 3, seed=t), seed=t)
    before = state(layer)
    x = randn(2, 4, 3, 3, seed=9)
    if mode == "no_grad":
        with torch.no_grad():
            out = layer(x.requires_grad_())
    else:
        out = layer(x)
    expected = batch_normalised(layer, x)
    torch.testing.assert_close(out, expected.detach() if mode == "no_grad" else expected, rtol=0, atol=1e-12)
    assert_state_equal(state(layer), before)


@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_eval_is_the_per_channel_affine_and_independent_of_the_batch(mode):
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0).double()
    for t in range(5):
        train_step(layer, randn(2, 4, 3, 3, seed=t) * (t + 1), seed=t)
    if mode == "eval":
        layer.eval()
    else:
        layer.frozen = True  # training mode, but the eval map
    before = state(layer)
    x = randn(3, 4, 3, 3, seed=7).requires_grad_()
    out = layer(x)
    scale, shift = layer.per_channel_affine()
    torch.testing.assert_close(scale, layer.weight / torch.sqrt(layer.running_var + EPS), rtol=1e-14, atol=0)
    torch.testing.assert_close(shift, layer.bias, rtol=0, atol=0)
    torch.testing.assert_close(out, per_channel(scale) * x + per_channel(shift), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer(x[1:2]), out[1:2], rtol=0, atol=1e-14)
    out.sum().backward()  # γ and β still learn with the population statistics
    assert layer.weight.grad.abs().sum() > 0
    assert_state_equal(state(layer), before)


def test_is_not_a_batchnorm_and_survives_frozen_bn_conversion():
    layer = MovingAverageBatchNorm2d(4, affine=False)
    assert not isinstance(layer, nn.modules.batchnorm._NormBase)
    assert FrozenBatchNorm2d.convert_frozen_batchnorm(layer) is layer
    assert layer.weight is None and [n for n, _ in layer.named_parameters()] == []
    x = randn(2, 4, 3, 3, seed=0, dtype=torch.float32).requires_grad_()
    torch.testing.assert_close(layer(x), x / torch.sqrt(per_channel(second_moment(x.detach())) + EPS))


@pytest.mark.parametrize("kwargs", [{"buffer_size": 0}, {"warmup_iters": -1}, {"rmax": 0.5},
                                    {"ema_decay": 1.0}])
def test_rejects_invalid_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        MovingAverageBatchNorm2d(4, **kwargs)
