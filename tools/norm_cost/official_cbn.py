"""A CBN with the official implementation's bookkeeping (Howal/Cross-iterationBatchNorm, commit
f6d3530, ``mmdet/models/utils/CBN.py``), written here as the cost baseline of ``tools/benchmark_norm.py``."""
import torch
import torch.nn as nn

from .measure import tensor_bytes


class OfficialStyleCrossIterationBN(nn.Module):
    """Baseline with the official CBN's bookkeeping (Howal/Cross-iterationBatchNorm CBN.py), for cost comparison.

    Each training step takes d mean/dW and d mean(x²)/dW by two ``torch.autograd.grad`` calls on the
    retained graph, compensates every stored iteration by ``<G_old, W_t - W_old>_c``, pools the
    valid entries, and prepends (mean, mean(x²), both gradients, a copy of W_t) to Python lists of
    at most ``window - 1`` entries. Eps inside the square root, as d2norm's CBN.
    """

    def __init__(self, num_features, window=8, momentum=0.1, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.past, self.momentum, self.eps = window - 1, momentum, eps
        self.history = []  # newest first: (mean, mean_sq, d mean/dW, d mean_sq/dW, W copy)

    def forward(self, x, conv_weight):
        mean, mean_sq = x.mean((0, 2, 3)), x.square().mean((0, 2, 3))
        ones = torch.ones_like(mean)
        (mean_grad,) = torch.autograd.grad(mean, conv_weight, ones, retain_graph=True)
        (mean_sq_grad,) = torch.autograd.grad(mean_sq, conv_weight, ones, retain_graph=True)
        w = conv_weight.detach()
        means, mean_sqs = [mean], [mean_sq]
        for old_mean, old_mean_sq, old_mean_grad, old_mean_sq_grad, old_w in self.history:
            delta = w - old_w
            means.append(old_mean + (old_mean_grad * delta).flatten(1).sum(1))
            mean_sqs.append(old_mean_sq + (old_mean_sq_grad * delta).flatten(1).sum(1))
        means, mean_sqs = torch.stack(means), torch.stack(mean_sqs)
        valid = mean_sqs - means.square() >= 0
        count = valid.sum(0)
        pooled_mean = torch.where(valid, means, 0).sum(0) / count
        pooled_var = torch.where(valid, mean_sqs, 0).sum(0) / count - pooled_mean.square()
        self.history.insert(0, (mean.detach(), mean_sq.detach(), mean_grad, mean_sq_grad, w.clone()))
        del self.history[self.past:]
        with torch.no_grad():
            samples = x.numel() // x.shape[1]
            unbiased_var = (mean_sq - mean.square()) * (samples / (samples - 1))
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased_var, self.momentum)
        scale = self.weight * torch.rsqrt(pooled_var + self.eps)
        return (x - pooled_mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]

    def window_state_bytes(self):
        return tensor_bytes(t for entry in self.history for t in entry)


class ConvOfficialStyleCBN(nn.Module):
    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x):
        return self.norm(self.conv(x), self.conv.weight)
