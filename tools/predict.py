#!/usr/bin/env python3
"""Run a trained d2norm model on images: visualised PNGs and/or COCO-style json.

    python tools/predict.py --config-file CONFIG --weights CHECKPOINT [--input IMAGE|FOLDER ... | --dataset NAME]
                            [--output DIR] [--json FILE] [--grid FILE] [KEY VALUE ...]

Without ``--input`` or ``--dataset``, the images of the config's first ``DATASETS.TEST``.

The model is built as in training (``d2norm.build_model``: ``cfg.D2NORM`` settings, so every
checkpoint tensor loads), put in eval mode and its norm layers are folded into their convs
(``d2norm.fold_norms``: inference at the cost of a plain conv, and no cross-iteration state).
"""
from d2norm.engine.third_party_warnings import silence_third_party_warnings

silence_third_party_warnings()  # this process's own: before detectron2's import-time warnings

import argparse
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from d2norm import build_model, fold_norms
from d2norm.config import load_config
from d2norm.data.unlabeled import IMAGE_SUFFIXES, image_files

logger = logging.getLogger("d2norm.predict")

VISUALISED_SIDE = 512  # smaller images are drawn enlarged to this longer side, so labels stay legible


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the config the model was trained with")
    parser.add_argument("--weights", help="checkpoint (.pth) to load; default: the config's MODEL.WEIGHTS")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", help="image files and/or folders of images")
    source.add_argument("--dataset", help="a registered dataset's images (default: the config's DATASETS.TEST[0])")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    parser.add_argument("--output", help="folder for one visualised PNG per image")
    parser.add_argument("--json", help="file for all detections in COCO results format")
    parser.add_argument("--grid", help="file for one PNG of all visualised images side by side")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="minimum detection score (default 0.5)")
    parser.add_argument("--no-fold", action="store_true", help="keep the norm layers (slower; for comparison)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if not (args.output or args.json or args.grid):
        parser.error("nothing to write: give --output, --json and/or --grid")
    return args


def setup_cfg(args):
    thresholds = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", args.score_thresh,
                  "MODEL.RETINANET.SCORE_THRESH_TEST", args.score_thresh]
    try:
        return load_config(args.config_file, [*args.opts, *thresholds], args.weights, require_weights=True)
    except ValueError as e:
        raise SystemExit(str(e)) from e


class Predictor:
    """detectron2's ``DefaultPredictor`` with d2norm's model building and folded norms."""

    def __init__(self, cfg, fold=True):
        self.cfg = cfg
        self.model = build_model(cfg)
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.model.eval()
        if fold:
            fold_norms(self.model)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    @torch.no_grad()
    def __call__(self, image):
        """Detections (``Instances`` on the CPU) for one image in ``cfg.INPUT.FORMAT`` (H, W, C)."""
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return self.model([{"image": tensor, "height": height, "width": width}])[0]["instances"].to("cpu")


def image_sources(args, dataset_name):
    """``(path, image_id)`` of every image to predict, in order."""
    if not args.input:
        if not dataset_name:
            raise SystemExit("no images: give --input or --dataset (the config has no DATASETS.TEST)")
        sources = [(Path(r["file_name"]), r["image_id"]) for r in DatasetCatalog.get(dataset_name)]
    else:
        try:
            paths = image_files(args.input)
        except FileNotFoundError as e:
            raise SystemExit(f"--input {e}") from e
        sources = [(path, index + 1) for index, path in enumerate(paths)]
    if args.limit > 0:
        sources = sources[: args.limit]
    if not sources:
        raise SystemExit("no images found (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
    return sources


def visualise(image_rgb, instances, metadata):
    scale = max(1.0, VISUALISED_SIDE / max(image_rgb.shape[:2]))
    drawn = Visualizer(image_rgb, metadata, scale=scale).draw_instance_predictions(instances)
    return drawn.get_image()  # RGB


def tile(images, columns=4, gap=4):
    """One RGB image of ``images`` in rows of ``columns``, white gaps between them."""
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    rows = -(-len(images) // columns)
    columns = min(columns, len(images))
    canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for k, im in enumerate(images):
        y, x = (k // columns) * (height + gap), (k % columns) * (width + gap)
        canvas[y: y + im.shape[0], x: x + im.shape[1]] = im
    return canvas


def contiguous_to_dataset_ids(metadata):
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    return {v: k for k, v in mapping.items()} if mapping else None


def main(args):
    cfg = setup_cfg(args)
    dataset_name = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    metadata = MetadataCatalog.get(dataset_name) if dataset_name else MetadataCatalog.get("__unused")
    sources = image_sources(args, dataset_name)
    predictor = Predictor(cfg, fold=not args.no_fold)
    logger.info(f"Predicting {len(sources)} images with {cfg.MODEL.WEIGHTS} "
                f"({'folded' if not args.no_fold else 'unfolded'} norms, score >= {args.score_thresh})")
    id_map = contiguous_to_dataset_ids(metadata)
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    results, drawn, seconds = [], [], 0.0
    for path, image_id in sources:
        image = read_image(str(path), format=cfg.INPUT.FORMAT)
        start = time.perf_counter()
        instances = predictor(image)
        seconds += time.perf_counter() - start
        for result in instances_to_coco_json(instances, image_id):
            if id_map:
                result["category_id"] = id_map[result["category_id"]]
            results.append({**result, "file_name": str(path)})
        if args.output or args.grid:
            image_rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
            picture = visualise(image_rgb, instances, metadata)
            drawn.append(picture)
            if args.output:
                cv2.imwrite(str(Path(args.output) / f"{path.stem}.png"), picture[:, :, ::-1])
    logger.info(f"{len(results)} detections; model time {1000 * seconds / len(sources):.1f} ms per image")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results))
        logger.info(f"Detections (COCO results format) written to {args.json}")
    if args.output:
        logger.info(f"Visualised images written to {args.output}/")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(args.grid, tile(drawn)[:, :, ::-1])
        logger.info(f"Predictions on {len(drawn)} images written to {args.grid}")
    return results


if __name__ == "__main__":
    setup_logger(name="fvcore")
    setup_logger(name="d2norm")
    main(parse_args())
