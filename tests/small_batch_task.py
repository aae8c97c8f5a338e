"""The small-batch proxy task: shape crops whose class depends on their contrast, and a tiny CNN
trained as on a cluster of workers (each normalising only its own images).

Each 24x24 grayscale image shows one shape of the built-in dataset (``d2norm.data.shapes``) near
the centre, at a random size and rotation, painted with a faint or a strong contrast over pixel
noise. The label is (category, contrast): 10 classes. Half of the label is a per-image intensity
scale, designed to be what BatchNorm over a 2-image batch partly divides away in training while
population statistics keep it at test time: the train/test inconsistency of small-batch BN
(Wu & Johnson 2021, Sec. 3).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2norm.data.shapes import ASPECT_RANGES, SHAPE_CATEGORIES, ShapeSpec, rasterize
from d2norm.layers.per_channel import per_channel, register_affine
from d2norm.layers.weight_centralization import centralize_conv_weight

IMAGE_SIZE = 24
RADIUS_RANGE = (6.0, 10.0)  # circumradius in pixels
CENTRE_JITTER = 1.5  # pixels
CONTRASTS = (0.5, 1.5)  # shape intensity over a zero background; part of the label
NOISE_STD = 0.2  # pixel noise
NUM_CLASSES = len(SHAPE_CATEGORIES) * len(CONTRASTS)


def make_split(count, seed):
    """``count`` images (N, 1, 24, 24) float32 and labels (N,) int64 (category * 2 + contrast)."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    labels = rng.integers(NUM_CLASSES, size=count)
    for i, label in enumerate(labels):
        category, contrast = divmod(int(label), len(CONTRASTS))
        name = SHAPE_CATEGORIES[category]
        centre = IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
        spec = ShapeSpec(name, (float(centre[0]), float(centre[1])), float(rng.uniform(*RADIUS_RANGE)),
                         float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(*ASPECT_RANGES[name])))
        mask, _ = rasterize(spec, IMAGE_SIZE)
        images[i, 0] = CONTRASTS[contrast] * mask + rng.normal(0.0, NOISE_STD, size=mask.shape)
    return torch.from_numpy(images), torch.from_numpy(labels)


class PerWorkerNorm(nn.Module):
    """``workers`` workers of a data-parallel job in one process: in training, the batch is cut into
    ``workers`` equal chunks and chunk r is normalised by worker r's own affine-free norm (its own
    statistics and cross-iteration state, as each GPU keeps its own), then the shared γ/β; the mean
    loss over the whole batch gives the gradient DDP averages over the workers. In eval mode worker
    0's statistics are used (detectron2 checkpoints rank 0's)."""

    def __init__(self, make, channels, workers):
        super().__init__()
        self.workers = workers
        self.levels = nn.ModuleList(make(channels, affine=False) for _ in range(workers))
        register_affine(self, channels, True)

    def forward(self, x):
        if self.training:
            if x.shape[0] % self.workers:
                raise ValueError(f"a batch of {x.shape[0]} does not split over {self.workers} workers")
            y = torch.cat([norm(chunk) for norm, chunk in zip(self.levels, x.chunk(self.workers))])
        else:
            y = self.levels[0](x)
        return y * per_channel(self.weight) + per_channel(self.bias)


def make_cnn(norm, workers, centralize=False, widths=(8, 16, 32)):
    """conv3x3 -> norm -> ReLU stages (2x2 max-pool after all but the last), global average pool,
    linear classifier. Each norm is a :class:`PerWorkerNorm` of ``norm(channels, affine=False)``;
    ``centralize``: weight-centralised convs (MABN's convention)."""
    layers, channels = [], 1
    for stage, width in enumerate(widths):
        conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        layers += [centralize_conv_weight(conv) if centralize else conv, PerWorkerNorm(norm, width, workers),
                   nn.ReLU()]
        if stage < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
    return nn.Sequential(*layers)


def train(model, images, labels, batch_size, epochs, lr_per_image, seed):
    """SGD (momentum 0.9) at ``lr_per_image * batch_size`` with a cosine schedule over ``epochs``
    passes in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    iterations = epochs * (len(images) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_per_image * batch_size, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


@torch.no_grad()
def accuracy(model, images, labels):
    """Top-1 accuracy in eval mode, i.e. with each norm layer's population statistics."""
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()
