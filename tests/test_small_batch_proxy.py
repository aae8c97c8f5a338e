"""Small-batch proxy: MABN at 2 images per batch beats BatchNorm at 2 and matches BatchNorm at 32,
the behaviour Yan et al. (MABN, ICLR 2020) claim for small batches, on a task that runs in the suite.

Task and model (tests/small_batch_task.py): 24x24 shape crops from the built-in dataset's
generator, 10 classes = 5 categories x 2 contrasts; a 3-stage conv3x3 -> norm -> ReLU CNN
(8/16/32 channels, about 6k parameters). Every variant sees the same 4096 samples (4 epochs of
1024 images, seeded order), SGD with momentum 0.9, the linear scaling rule (lr 0.4 at 32 images,
0.025 at 2) and a cosine schedule: 128 iterations at batch 32, 2048 at batch 2. Evaluation is in
eval mode on 1024 held-out images, i.e. with each layer's population statistics.

Settings, scaled from the papers' schedules to 2048 iterations:

- MABN: m = 16 iterations in the moving averages (the official code's real_B / B = 32 / 2, so they
  span the 32 images of the reference batch); 100 warm-up iterations with batch statistics (the
  official default); r = 1 for the first 400 iterations (20%) rather than the official 1000, which
  would be half of this run, so that the EMA that r renormalises towards (decay 0.98, a memory of
  about 50 iterations) has settled first; then r is clipped to [1/5, 5]; convs weight-centralised
  by ``prepare_model``.
- CBN: k = 8 iterations (16 images), burn-in 512 iterations (25% of training, as the paper's
  COCO configs: 3 of 12 epochs).

Measured test accuracy (seeds 0-4; chance is 0.10; the test runs seeds 0 and 1 to stay near
30 s of CPU):

    seed   BN@2   BN@32  MABN@2  CBN@2  BN@2 recalibrated  CBN@2 recalibrated
      0    0.476  0.593  0.626   0.419  0.496              0.460
      1    0.486  0.561  0.630   0.388  0.486              0.424
      2    0.553  0.552  0.723   0.402  0.530              0.416
      3    0.450  0.645  0.651   0.406  0.482              0.407
      4    0.486  0.423  0.667   0.415  0.501              0.440

MABN@2 - BN@2 ranged over [0.144, 0.201] and MABN@2 - BN@32 over [0.006, 0.244]; the tests
assert +0.08 and -0.05, which held with margin on every seed. ("Recalibrated": population
statistics recomputed over the 1024 training images with the trained weights, as PreciseBN.)

Not asserted, because it did not hold on every seed or held the other way:

- BN@32 > BN@2: the gap was +0.117, +0.075, -0.001, +0.195, -0.063. At equal samples BN@32 makes
  only 128 SGD steps and is under-trained by a seed-dependent amount. More samples did not obviously
  help: in a trial of an earlier version of this task (first conv unpadded) with 16k samples, seed 0
  gave BN@32 0.806 against BN@2 0.843. A robust BN@32 > BN@2 gap was not found within seconds of CPU.
- CBN@2 >= BN@2: CBN lost to BN@2 on every seed (by 0.04-0.15), also with recalibrated population
  statistics, so stale running statistics are not the cause. On seed 0 a smaller window did not
  help (k = 2: 0.387, k = 4: 0.415, k = 8: 0.419) and a 75% burn-in (pooling only in the last 512
  iterations) gave 0.490, about BN@2's 0.476: every stretch of pooled training made this model
  worse. As even one past iteration (k = 2) hurts, the age of the pooled statistics does not
  explain it; whether the cause is the switch at the end of burn-in, the first-order compensation
  (Yao et al., Eq. 6-7) or a defect is open (issue #9, item 3 studies CBN's dynamics).
"""
import pytest
import torch
import torch.nn as nn
from small_batch_task import accuracy, make_cnn, make_split, train

from d2norm.layers import MovingAverageBatchNorm2d

SEEDS = (0, 1)
TRAIN_IMAGES, TEST_IMAGES = 1024, 1024
EPOCHS = 4
BASE_LR = 0.4  # at 32 images per batch


def mabn(channels):
    return MovingAverageBatchNorm2d(channels, buffer_size=16, warmup_iters=100, renorm_free_iters=400)


VARIANTS = {  # name: (norm, images per batch)
    "BN@2": (nn.BatchNorm2d, 2),
    "BN@32": (nn.BatchNorm2d, 32),
    "MABN@2": (mabn, 2),
}


@pytest.fixture(scope="module")
def test_accuracy():
    """{(variant, seed): eval-mode test accuracy}."""
    results = {}
    for seed in SEEDS:
        train_images, train_labels = make_split(TRAIN_IMAGES, 1000 + seed)
        test_images, test_labels = make_split(TEST_IMAGES, 2000 + seed)
        for name, (norm, batch_size) in VARIANTS.items():
            torch.manual_seed(seed)
            model = train(make_cnn(norm), train_images, train_labels, batch_size, EPOCHS, BASE_LR, seed)
            results[name, seed] = accuracy(model, test_images, test_labels)
    return results


@pytest.mark.parametrize("seed", SEEDS)
def test_mabn_at_2_images_matches_batchnorm_at_32(test_accuracy, seed):
    assert test_accuracy["MABN@2", seed] >= test_accuracy["BN@32", seed] - 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_mabn_at_2_images_beats_batchnorm_at_2(test_accuracy, seed):
    assert test_accuracy["MABN@2", seed] >= test_accuracy["BN@2", seed] + 0.08
