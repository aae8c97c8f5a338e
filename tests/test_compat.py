"""The torch and detectron2 internals d2norm relies on (d2norm._compat) behave as it assumes."""
import pytest
import torch
import torch.nn.functional as F

from d2norm._compat import batch_norm_backward_reductions, inside_autograd_backward


def test_inside_autograd_backward_is_true_only_while_a_backward_runs():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", inside_autograd_backward()))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", inside_autograd_backward()))
            return grad

    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen == [("forward", False), ("backward", True)] and not inside_autograd_backward()


@pytest.mark.parametrize("input_grad", [True, False])
def test_batch_norm_backward_reductions_are_input_gradient_and_the_two_channel_sums(input_grad):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1
    grad_out = torch.randn_like(x)
    F.batch_norm(x, mean, var, weight, None, False, 0.0, 1e-5).backward(grad_out)

    grad_input, sum_g_x_hat, sum_g = batch_norm_backward_reductions(
        grad_out, x.detach(), weight.detach(), mean, var, 1e-5, input_grad)
    x_hat = (x.detach() - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt()
    torch.testing.assert_close(sum_g_x_hat, (grad_out * x_hat).sum((0, 2, 3)))
    torch.testing.assert_close(sum_g_x_hat, weight.grad)
    torch.testing.assert_close(sum_g, grad_out.sum((0, 2, 3)))
    if input_grad:
        torch.testing.assert_close(grad_input, x.grad)
    else:
        assert grad_input is None


def test_detectron2_has_a_local_process_group_to_set():
    from detectron2.utils import comm

    assert hasattr(comm, "create_local_process_group") or hasattr(comm, "_LOCAL_PROCESS_GROUP")
    assert callable(comm.get_local_size) and callable(comm.get_local_rank)
