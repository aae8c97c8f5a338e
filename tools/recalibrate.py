#!/usr/bin/env python3
"""Recompute a trained model's population statistics on unlabeled images of a new domain.

    python tools/recalibrate.py --config-file CONFIG --weights CHECKPOINT --images FOLDER|DATASET
                                --output NEW.pth [--num-iter N] [--batch-size B] [KEY VALUE ...]

"Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021), Sec. 5.1: a model whose normalization
layers estimate population statistics (BN, SyncBN, CBN, MABN, PreciseBN, BRN) can be adapted to
a target domain without labels by recomputing those statistics on the domain's images. The model
runs as at inference (its heads see its own proposals and detections), each norm layer
normalising with its batch's statistics, and each layer's statistics are pooled over all
``--num-iter`` batches (``d2norm.recalibrate(..., labels=False)``). Nothing else changes: the
written checkpoint (``{"model": state_dict}``, loadable as ``MODEL.WEIGHTS``) has the same
parameters and new statistics.
"""
from d2norm.engine.third_party_warnings import silence_third_party_warnings

silence_third_party_warnings()  # this process's own: before detectron2's import-time warnings

import argparse
import logging
import os
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from d2norm import build_model, recalibrate
from d2norm.config import load_config
from d2norm.data.unlabeled import unlabeled_batches, unlabeled_image_paths
from d2norm.modeling.build import norm_layer_summary
from d2norm.statistics.recalibration import population_norm_layers

logger = logging.getLogger("d2norm.recalibrate")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the config the model was trained with")
    parser.add_argument("--weights", help="checkpoint (.pth) to recalibrate; default: the config's MODEL.WEIGHTS")
    parser.add_argument("--images", required=True,
                        help="a folder of images of the target domain, or a registered dataset (labels unused)")
    parser.add_argument("--output", required=True, help="the checkpoint to write (.pth)")
    parser.add_argument("--num-iter", type=int, default=0,
                        help="batches to pool (default 0: every image once)")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="images per batch (default 2, the per-GPU batch of the papers' configs)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_iter < 0:
        parser.error("--batch-size must be >= 1 and --num-iter >= 0")
    return args


def setup_cfg(args):
    try:
        return load_config(args.config_file, args.opts, args.weights, require_weights=True)
    except ValueError as e:
        raise SystemExit(str(e)) from e


def _counted(batches, progress):
    """``batches``, advancing ``progress`` as each is handed to the model."""
    for batch in batches:
        progress.update()
        yield batch


def main(args):
    cfg = setup_cfg(args)
    try:
        paths = unlabeled_image_paths(args.images)
    except ValueError as e:
        raise SystemExit(f"--images {e}") from e
    num_iter = args.num_iter or max(1, len(paths) // args.batch_size)
    if num_iter * args.batch_size > len(paths):
        raise SystemExit(f"--num-iter {num_iter} x --batch-size {args.batch_size} needs "
                         f"{num_iter * args.batch_size} images; {args.images} has {len(paths)}")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    if not population_norm_layers(model):
        raise SystemExit(
            f"{args.config_file}: the model has no normalization layer with population statistics (BN, SyncBN, "
            f"CBN, MABN, PreciseBN, BRN), so there is nothing to recalibrate; its norm layers: "
            f"{norm_layer_summary(model) or 'none'}")
    batches = unlabeled_batches(paths, args.batch_size, cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST,
                                cfg.INPUT.MAX_SIZE_TEST)
    logger.info(f"Recalibrating {cfg.MODEL.WEIGHTS} on {num_iter * args.batch_size} images of {args.images}")
    with tqdm(total=num_iter, desc="recalibrating", unit="batch") as progress:
        recalibrate(model, _counted(batches, progress), num_iter, labels=False)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".tmp")
    torch.save({"model": model.state_dict(), "recalibrated_on": str(args.images),
                "recalibration_images": num_iter * args.batch_size, "weights": str(cfg.MODEL.WEIGHTS)}, partial)
    os.replace(partial, output)  # an interrupted run leaves no half-written checkpoint
    logger.info(f"Recalibrated checkpoint written to {output}")
    return output


if __name__ == "__main__":
    setup_logger(name="fvcore")
    setup_logger(name="d2norm")
    main(parse_args())
