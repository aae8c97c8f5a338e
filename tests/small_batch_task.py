"""The small-batch proxy task: shape crops whose class depends on their contrast, and a tiny CNN.

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
from d2norm.modeling.binding import prepare_model

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


def make_cnn(norm, widths=(8, 16, 32)):
    """conv3x3 -> norm -> ReLU stages (2x2 max-pool after all but the last), global average pool,
    linear classifier. ``norm(channels)`` builds each norm; each conv -> norm pair sits in an
    ``nn.Sequential``, so ``prepare_model`` binds CBN to its conv and centralises MABN's conv."""
    layers, channels = [], 1
    for stage, width in enumerate(widths):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
        if stage < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)]
    return prepare_model(nn.Sequential(*layers), example_inputs=(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE),))


def train(model, images, labels, batch_size, epochs, base_lr, seed):
    """SGD (momentum 0.9) with the linear scaling rule (lr = base_lr * batch_size / 32) and a cosine
    schedule over ``epochs`` passes in a seeded order: every batch size sees the same samples."""
    generator = torch.Generator().manual_seed(seed)
    iterations = epochs * (len(images) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr * batch_size / 32, momentum=0.9)
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
