"""Classification pretraining of a detector trunk on procedural images: the study's ImageNet.

The CBN paper's COCO results fine-tune an ImageNet-pretrained ResNet whose BN statistics are
frozen (Yao et al. 2021, Sec. 5.2; detectron2's MSRA weights with ``FrozenBN``). ImageNet is not
available everywhere, so :func:`pretrain_trunk` makes the analogue: detectron2's own ResNet, with
BN over large batches, trained to classify :mod:`d2norm.data.classification` images (20 classes,
4x the detection set's 5). The result is a detectron2 checkpoint whose keys are those of
``backbone.bottom_up`` in an FPN detector, so ``MODEL.WEIGHTS`` loads it as it loads MSRA weights,
BN statistics and affine into ``FrozenBN`` layers.

Training is deterministic for a given :class:`PretrainSettings` and thread count, resumable (a
checkpoint every ``checkpoint_period`` iterations), and cached: :func:`ensure_pretrained_trunk`
trains only when the file is missing or was made with other settings.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone

from ..data.classification import CLASSES, classification_image

__all__ = ["PretrainSettings", "TrunkClassifier", "build_trunk", "ensure_pretrained_trunk", "evaluate_accuracy",
           "pretrain_trunk", "trunk_state_dict"]

logger = logging.getLogger(__name__)
KEY_PREFIX = "backbone.bottom_up."  # where an FPN detector keeps its ResNet
_VERSION = 1  # bump when the training or the image generator changes its result


@dataclass(frozen=True)
class PretrainSettings:
    """What the pretrained trunk depends on (its cache key). Pixel mean/std and channel order are
    the detector's (``MODEL.PIXEL_MEAN``/``PIXEL_STD``, BGR), so the detector sees the inputs the
    trunk was trained on."""

    depth: int = 18
    image_size: int = 64
    batch_size: int = 128
    iterations: int = 1000
    base_lr: float = 0.2  # SGD for 128 images (Goyal et al. 2017: 0.1 per 256, doubled for the short run)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    seed: int = 0
    pixel_mean: tuple = (103.530, 116.280, 123.675)
    pixel_std: tuple = (57.375, 57.12, 58.395)
    version: int = _VERSION


def build_trunk(depth=18):
    """detectron2's ResNet (``build_resnet_backbone``) with BN, nothing frozen, ``res5`` out."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


class TrunkClassifier(nn.Module):
    """The trunk, global average pooling and a linear classifier; inputs are uint8 BGR images."""

    def __init__(self, settings: PretrainSettings):
        super().__init__()
        self.trunk = build_trunk(settings.depth)
        self.head = nn.Linear(self.trunk.output_shape()["res5"].channels, len(CLASSES))
        self.register_buffer("pixel_mean", torch.tensor(settings.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(settings.pixel_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return self.head(self.trunk(x)["res5"].mean(dim=(2, 3)))


class _Images(torch.utils.data.Dataset):
    def __init__(self, seed, size, start, stop, flip):
        self.seed, self.size, self.start, self.stop, self.flip = seed, size, start, stop, flip

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        image, label = classification_image(self.seed, self.start + i, self.size)
        if self.flip and (self.start + i) % 2:  # deterministic horizontal flip of every other image
            image = image[:, ::-1]
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), label


def _loader(settings, seed, start, stop, flip):
    return torch.utils.data.DataLoader(_Images(seed, settings.image_size, start, stop, flip),
                                       batch_size=settings.batch_size, shuffle=False, num_workers=1)


def _lr(settings, iteration):
    """Linear warm-up from 0.1x, then cosine to zero."""
    if iteration < settings.warmup_iters:
        return settings.base_lr * (0.1 + 0.9 * iteration / settings.warmup_iters)
    progress = (iteration - settings.warmup_iters) / max(1, settings.iterations - settings.warmup_iters)
    return settings.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def trunk_state_dict(model: TrunkClassifier):
    """The trunk's parameters and BN statistics under the FPN detector's key names (no
    ``num_batches_tracked``: ``FrozenBatchNorm2d`` has none)."""
    return {KEY_PREFIX + k: v.detach().clone() for k, v in model.trunk.state_dict().items()
            if not k.endswith("num_batches_tracked")}


@torch.no_grad()
def evaluate_accuracy(model, settings, num_images=2048):
    """Top-1 accuracy on ``num_images`` held-out images (seed ``settings.seed + 1``), eval mode."""
    model.eval()
    correct = 0
    for images, labels in _loader(settings, settings.seed + 1, 0, num_images, flip=False):
        correct += int((model(images).argmax(1) == labels).sum())
    return correct / num_images


def _settings_key(settings):
    return hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:16]


def pretrain_trunk(settings: PretrainSettings, output, log=logger.info, checkpoint_period=100):
    """Train the trunk classifier and write ``output`` (detectron2 checkpoint of the trunk) and
    ``output`` + ``.json`` (settings, accuracy, sha256). Resumes from ``output`` + ``.resume.pth``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    resume = output.with_name(output.name + ".resume.pth")
    torch.manual_seed(settings.seed)
    model = TrunkClassifier(settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.base_lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    start = 0
    if resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=False)
        if state["key"] == _settings_key(settings):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["iteration"]
            log(f"[pretrain] resuming at iteration {start} from {resume}")
    model.train()
    started, loss_average = time.time(), None
    images_seen = settings.iterations * settings.batch_size
    for iteration, (images, labels) in enumerate(
            _loader(settings, settings.seed, start * settings.batch_size, images_seen, flip=True), start=start):
        for group in optimizer.param_groups:
            group["lr"] = _lr(settings, iteration)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        loss_average = value if loss_average is None else 0.9 * loss_average + 0.1 * value
        done = iteration + 1
        if done % 20 == 0 or done == settings.iterations:
            per_iter = (time.time() - started) / (done - start)
            log(f"[pretrain] iteration {done}/{settings.iterations}, loss {loss_average:.3f}, "
                f"lr {_lr(settings, iteration):.4f}, ETA {int(per_iter * (settings.iterations - done))} s")
        if done % checkpoint_period == 0 and done < settings.iterations:
            temporary = resume.with_name(resume.name + ".tmp")
            torch.save({"key": _settings_key(settings), "iteration": done, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict()}, temporary)
            os.replace(temporary, resume)
    accuracy = evaluate_accuracy(model, settings)
    log(f"[pretrain] held-out top-1 accuracy over {len(CLASSES)} classes: {accuracy:.3f}")
    temporary = output.with_name(output.name + ".tmp")
    torch.save({"model": trunk_state_dict(model), "__author__": "d2norm.engine.pretrain"}, temporary)
    os.replace(temporary, output)
    manifest = {"settings": dataclasses.asdict(settings), "key": _settings_key(settings), "accuracy": accuracy,
                "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1),
                "sha256": hashlib.sha256(output.read_bytes()).hexdigest()}
    output.with_name(output.name + ".json").write_text(json.dumps(manifest, indent=1) + "\n")
    resume.unlink(missing_ok=True)
    return manifest


def ensure_pretrained_trunk(output, settings: PretrainSettings = PretrainSettings(), log=logger.info):
    """The manifest of the trunk at ``output``, trained first if missing, incomplete or made with
    other settings."""
    output = Path(output)
    manifest_path = output.with_name(output.name + ".json")
    if output.exists() and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == _settings_key(settings) and \
                manifest.get("sha256") == hashlib.sha256(output.read_bytes()).hexdigest():
            log(f"[pretrain] {output} is up to date (accuracy {manifest['accuracy']:.3f})")
            return manifest
        log(f"[pretrain] {output} was made with other settings or is corrupt: training again")
    return pretrain_trunk(settings, output, log)
