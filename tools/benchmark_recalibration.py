#!/usr/bin/env python3
"""Cost of PreciseBN recalibration vs a plain inference pass, side by side in one run.

Recalibration (``d2norm.recalibrate``) runs training-mode forwards under ``no_grad`` (detectron2
models need GT for proposal sampling) and pools per-layer statistics; inference runs eval-mode
forwards. Both see the same images from the built-in dataset. Reported: seconds per 100 images
and their ratio.
"""
import argparse
import json
import time

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader

import d2norm

DEFAULT_CONFIG = "configs/demo/mask_rcnn_R_18_FPN_MABN_shapes.yaml"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--norm", default="PreciseBN", help="norm for backbone, FPN and heads")
    parser.add_argument("--batches", type=int, default=25, help="batches of IMS_PER_BATCH images per pass")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    return parser.parse_args()


def build(args):
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        cfg.MODEL[key].NORM = args.norm
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg, d2norm.build_model(cfg)


def cached_batches(cfg, n):
    loader = iter(build_detection_train_loader(cfg))
    return [next(loader) for _ in range(n)]


def time_recalibration(model, batches):
    start = time.perf_counter()
    d2norm.recalibrate(model, batches, num_iters=len(batches))
    return time.perf_counter() - start


@torch.no_grad()
def time_inference(model, batches):
    model.eval()
    start = time.perf_counter()
    for batch in batches:
        model([{"image": d["image"], "height": d["height"], "width": d["width"]} for d in batch])
    elapsed = time.perf_counter() - start
    model.train()
    return elapsed


def main():
    args = parse_args()
    cfg, model = build(args)
    batches = cached_batches(cfg, args.batches)
    images = sum(len(b) for b in batches)
    time_recalibration(model, batches[:2])  # warm-up (allocator, lazy init); also makes eval legal
    recal = time_recalibration(model, batches)
    infer = time_inference(model, batches)
    result = {
        "device": cfg.MODEL.DEVICE,
        "norm": args.norm,
        "images": images,
        "recalibration_s_per_100_images": 100 * recal / images,
        "inference_s_per_100_images": 100 * infer / images,
        "ratio_recalibration_over_inference": recal / infer,
    }
    print("| pass | s / 100 images |\n|---|---|")
    print(f"| recalibration ({args.norm}, training-mode forward, no grad) "
          f"| {result['recalibration_s_per_100_images']:.2f} |")
    print(f"| inference (eval-mode forward) | {result['inference_s_per_100_images']:.2f} |")
    print(f"\nrecalibration / inference = {result['ratio_recalibration_over_inference']:.2f} "
          f"({images} images, {cfg.MODEL.DEVICE}, {torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
