"""Small-batch proxy: MABN at 2 images per batch beats BatchNorm at 2 and matches BatchNorm at 32
(Yan et al., ICLR 2020, Sec. 5: MABN at small batch recovers regular-batch BN accuracy).

Task and model (tests/small_batch_task.py): 24x24 shape crops from the built-in dataset's
generator, 10 classes = 5 categories x 2 contrasts; a 3-stage conv3x3 -> norm -> ReLU CNN
(8/16/32 channels, about 7k parameters). Every variant sees the same 4096 samples (4 epochs of
1024 images, seeded order), SGD with momentum 0.9, the linear scaling rule (lr 0.4 at 32 images,
0.025 at 2) and a cosine schedule: 128 iterations at batch 32, 2048 at batch 2. Evaluation is in
eval mode on 1024 held-out images, i.e. with each layer's population statistics.

Settings, scaled from the papers' schedules to 2048 iterations:

- MABN (Yan et al., Sec. 4): m = 16 iterations in the moving averages (16 x 2 = the 32 images of
  the reference batch); 100 warm-up iterations (5% of training) with batch statistics while the
  weights move fastest; r = 1 for the first 400 (20%), so that the EMA that r renormalises towards
  (decay 0.98, a memory of about 50 iterations) has settled; then r is clipped to [1/5, 5]; convs
  weight-centralised by ``prepare_model``.
- CBN (Yao et al., Sec. 4): k = 8 iterations (16 images), burn-in 512 iterations (25% of training,
  as the paper's 3 of 12 COCO epochs).

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
  only 128 SGD steps and is under-trained by a seed-dependent amount; the runs that would settle it
  (BN@32 needs about 1000 steps here, i.e. 16k+ iterations at batch 2 per variant) cost minutes,
  which belongs to the study tool, not the test suite.
- CBN@2 >= BN@2: CBN lost to BN@2 on every seed (by 0.04-0.15), also with recalibrated population
  statistics, so the loss comes from training after burn-in, not from stale running statistics:
  at this schedule's learning rate the weights move too much within the 8-iteration window for
  the first-order compensation (Yao et al., Sec. 3.2, which assumes small weight changes).
"""
import pytest
import torch
import torch.nn as nn

from d2norm.layers import MovingAverageBatchNorm2d
from small_batch_task import accuracy, make_cnn, make_split, train

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
