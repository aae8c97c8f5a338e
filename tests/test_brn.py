"""BRN (Batch Renormalization, Ioffe 2017): Algorithm 1 in float64 against a direct transcription,
the paper's r_max / d_max schedule, BatchNorm before it starts, state and config."""
import pytest
import torch
import torch.nn as nn
from detectron2.config import get_cfg

import d2norm
from d2norm.config import D2NormConfigError, add_d2norm_config, scale_norm_iterations, validate_d2norm_config
from d2norm.layers import BatchRenorm2d
from d2norm.modeling.registry import configured_factory


def batches(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) * (1 + t % 3) + t % 2,
             torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)) for t in range(steps)]


def reference_step(x, grad_out, state, gamma, beta, r_max, d_max, momentum, eps):
    """Ioffe 2017, Algorithm 1, written out: returns y, (dx, dgamma, dbeta) and the next state."""
    x = x.clone().requires_grad_()
    gamma, beta = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    mean_b = x.mean(dim=(0, 2, 3))
    sigma_b = torch.sqrt(((x - mean_b.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3)) + eps)
    sigma = torch.sqrt(state["var"] + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean_b - state["mean"]) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mean_b.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    y = gamma.view(1, -1, 1, 1) * x_hat + beta.view(1, -1, 1, 1)
    grads = torch.autograd.grad(y, (x, gamma, beta), grad_out)
    n = x.numel() // x.shape[1]
    unbiased = (sigma_b.detach() ** 2 - eps) * n / (n - 1)
    next_state = {"mean": (1 - momentum) * state["mean"] + momentum * mean_b.detach(),
                  "var": (1 - momentum) * state["var"] + momentum * unbiased}
    return y.detach(), grads, next_state


def test_training_matches_algorithm_1_with_r_and_d_constant_in_the_backward():
    """Tight bounds reached after two iterations, so r and d are clipped in most channels."""
    layer = BatchRenorm2d(3, rmax=1.2, dmax=0.1, warmup_iters=1, rmax_iters=3, dmax_iters=2, momentum=0.3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    state = {"mean": torch.zeros(3, dtype=torch.float64), "var": torch.ones(3, dtype=torch.float64)}
    clipped = 0
    for t, (x, grad_out) in enumerate(batches(8), start=1):
        r_max, d_max = (float(b) for b in layer.clip_bounds(torch.tensor(t)))
        y_ref, grads_ref, state = reference_step(x, grad_out, state, gamma, beta, r_max, d_max, 0.3, layer.eps)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        grads = torch.autograd.grad(y, (xi, layer.weight, layer.bias), grad_out)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, state["mean"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_var, state["var"], rtol=1e-12, atol=1e-14)
        statistics = layer.training_statistics(x) if t < 8 else None
        clipped += statistics is not None and float(statistics.metrics["brn_r_clip_rate"]) > 0
    assert int(layer.train_iterations) == 8 and clipped > 0


def test_before_the_ramps_and_in_eval_it_is_batchnorm():
    brn = BatchRenorm2d(3, warmup_iters=5).double()
    bn = nn.BatchNorm2d(3).double()
    for x, grad_out in batches(5):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = brn(xa), bn(xb)
        torch.testing.assert_close(ya, yb, rtol=0, atol=1e-13)
        ya.backward(grad_out)
        yb.backward(grad_out)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    assert torch.equal(brn.running_mean, bn.running_mean) and torch.equal(brn.running_var, bn.running_var)
    brn.eval()
    bn.eval()
    x = batches(1, seed=3)[0][0]
    torch.testing.assert_close(brn(x), bn(x), rtol=0, atol=0)


def test_unclipped_r_and_d_give_the_inference_normalization_in_training():
    """Ioffe 2017 Sec. 3: with r and d unclipped, x̂ = (x - μ)/σ, the inference map (before the update)."""
    layer = BatchRenorm2d(3, rmax=1e6, dmax=1e6, warmup_iters=0, rmax_iters=0, dmax_iters=0).double()
    for x, _ in batches(3):
        layer(x.clone().requires_grad_())
    x = batches(1, seed=5)[0][0]
    expected = nn.functional.batch_norm(x, layer.running_mean.clone(), layer.running_var.clone(),
                                        layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(layer(x.clone().requires_grad_()), expected, rtol=1e-12, atol=1e-12)


def test_the_papers_schedule():
    """BN for 5000 iterations, r_max 1 -> 3 by 40k and d_max 0 -> 5 by 25k, linearly."""
    layer = BatchRenorm2d(4)
    iterations = (1, 5000, 15000, 22500, 40000, 90000)
    bounds = {t: tuple(float(b) for b in layer.clip_bounds(torch.tensor(t))) for t in iterations}
    assert bounds[1] == bounds[5000] == (1.0, 0.0)
    assert bounds[15000][1] == pytest.approx(2.5) and bounds[22500][0] == pytest.approx(2.0)  # half way
    assert bounds[40000] == bounds[90000] == (3.0, 5.0)
    assert layer.in_warmup()
    layer.skip_warmup()
    assert not layer.in_warmup() and int(layer.train_iterations) == 40000


def test_the_schedule_survives_a_checkpoint_and_a_batchnorm_checkpoint_loads():
    layer = BatchRenorm2d(3, warmup_iters=1, rmax_iters=4, dmax_iters=4, rmax=1.5, dmax=0.5).double()
    for x, _ in batches(3):
        layer(x.clone().requires_grad_())
    restored = BatchRenorm2d(3, warmup_iters=1, rmax_iters=4, dmax_iters=4, rmax=1.5, dmax=0.5).double()
    restored.load_state_dict(layer.state_dict())
    assert int(restored.train_iterations) == 3
    x = batches(1, seed=7)[0][0]
    torch.testing.assert_close(restored(x.clone().requires_grad_()), layer(x.clone().requires_grad_()), rtol=0, atol=0)
    from_bn = BatchRenorm2d(3).double()
    from_bn.load_state_dict(nn.BatchNorm2d(3).double().state_dict())
    assert int(from_bn.train_iterations) == 0


def test_brn_is_registered_its_config_keys_reach_it_and_rescale_with_the_world_size():
    cfg = get_cfg()
    add_d2norm_config(cfg)
    default = d2norm.get_norm("BRN", 4)
    assert isinstance(default, BatchRenorm2d) and (default.rmax, default.dmax, default.warmup_iters) == (3.0, 5.0, 5000)
    cfg.merge_from_list(["D2NORM.BRN.RMAX", 2.0, "D2NORM.BRN.WARMUP_ITERS", 100, "D2NORM.BRN.RMAX_ITERS", 800,
                         "D2NORM.BRN.DMAX_ITERS", 500, "SOLVER.REFERENCE_WORLD_SIZE", 8])
    layer = configured_factory("BRN", scale_norm_iterations(cfg, 4).D2NORM)(4)
    assert (layer.rmax, layer.warmup_iters, layer.rmax_iters, layer.dmax_iters) == (2.0, 200, 1600, 1000)
    cfg.D2NORM.BRN.RMAX = 0.5
    with pytest.raises(D2NormConfigError, match="D2NORM.BRN.RMAX"):
        validate_d2norm_config(cfg)
    with pytest.raises(ValueError, match="rmax"):
        BatchRenorm2d(4, rmax=0.5)
