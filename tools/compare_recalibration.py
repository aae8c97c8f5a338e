#!/usr/bin/env python3
"""COCO AP of trained checkpoints after recalibration in the training regime vs the inference regime.

For each checkpoint directory (``config.yaml`` and ``model_final.pth``, as tools/train_net.py
writes them), the model is recalibrated from the checkpoint twice on the same training batches —
``d2norm.recalibrate`` (upstream layers use batch statistics; PreciseBN, "Rethinking 'Batch' in
BatchNorm" Sec. 3) and ``d2norm.statistics.inference_regime.recalibrate_in_inference_regime`` (upstream layers
use the population statistics, iterated to a fixed point) — and evaluated (COCO box and mask AP)
on the config's first test set. Prints a markdown table, one row per checkpoint, and the mean
difference per norm.

    python tools/compare_recalibration.py output/study/*/ --num-iter 50
"""
import argparse
import copy
import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.utils.env import seed_all_rng

import d2norm
from d2norm.statistics.inference_regime import recalibrate_in_inference_regime

NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="directories with config.yaml and model_final.pth")
    parser.add_argument("--num-iter", type=int, help="recalibration batches (default: D2NORM.PRECISE_BN.NUM_ITER)")
    parser.add_argument("--max-passes", type=int, default=0,
                        help="inference regime: at most this many passes (0: number of norm layers + 1)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="inference regime: stop below this change")
    parser.add_argument("--weights", default="model_final.pth",
                        help="checkpoint file in each directory; 'last': the one named in last_checkpoint")
    parser.add_argument("--dataset", help="evaluation set (default: the config's first DATASETS.TEST)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recalibration batches")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser.parse_args(argv)


def load_config(directory):
    """The checkpoint's config (keys this d2norm does not know are kept), on the CPU without CUDA."""
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(Path(directory) / "config.yaml"))
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def norm_label(cfg):
    """``"CBN"`` when one norm is used throughout, else backbone/FPN/box head/mask head norms."""
    norms = [cfg.MODEL[key].NORM or "none" for key in NORM_KEYS]
    return norms[0] if len(set(norms)) == 1 else "/".join(norms)


def evaluate(cfg, model, dataset):
    """COCO box and mask AP on ``dataset``."""
    evaluator = COCOEvaluator(dataset, output_dir=None, use_fast_impl=False)
    results = inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    # detectron2's COCOEvaluator returns nothing for a model without any detection: AP 0.
    return {task: results.get(task, {}).get("AP", 0.0) for task in tasks}


def checkpoint_file(directory, weights):
    """``directory/weights``, or with ``weights == "last"`` the checkpoint named in ``last_checkpoint``."""
    directory = Path(directory)
    if weights == "last":
        tag = directory / "last_checkpoint"
        if not tag.is_file():
            raise SystemExit(f"{tag} does not exist: no checkpoint was saved in {directory}.")
        weights = tag.read_text().strip()
    path = directory / weights
    if not path.is_file():
        raise SystemExit(f"{path} does not exist (--weights {weights}).")
    return path


def compare(directory, num_iter=None, max_passes=0, tolerance=0.01, seed=0, weights="model_final.pth",
            dataset=None):
    """One row: AP after each regime's recalibration, passes and seconds of each recalibration."""
    cfg = load_config(directory)
    dataset = dataset or next(iter(cfg.DATASETS.TEST), None)
    if dataset is None:
        raise SystemExit(f"{Path(directory) / 'config.yaml'} has no DATASETS.TEST: pass --dataset.")
    num_iter = num_iter or cfg.D2NORM.PRECISE_BN.NUM_ITER
    trained = d2norm.build_model(cfg)
    weights_file = checkpoint_file(directory, weights)
    DetectionCheckpointer(trained).load(str(weights_file))
    seed_all_rng(seed)
    loader = iter(build_detection_train_loader(cfg))
    batches = [next(loader) for _ in range(num_iter)]
    row = {"checkpoint": str(directory), "weights": weights_file.name, "norm": norm_label(cfg), "seed": cfg.SEED,
           "num_iter": num_iter}
    for regime in ("training", "inference"):
        model = copy.deepcopy(trained)
        start = time.perf_counter()
        if regime == "training":
            d2norm.recalibrate(model, batches, num_iter)
        else:
            row["passes"], row["last_change"] = recalibrate_in_inference_regime(
                model, batches, num_iter, max_passes, tolerance)
        row[f"{regime}_s"] = time.perf_counter() - start
        for task, ap in evaluate(cfg, model, dataset).items():
            row[f"{regime}_{task}_ap"] = ap
    return row


def _cell(row, key):
    value = row.get(key)
    return "–" if value is None else f"{value:.2f}"


def markdown_table(rows):
    lines = [
        "| checkpoint | weights | norm | box AP, training regime | box AP, inference regime | mask AP, training regime "
        "| mask AP, inference regime | passes | recalibration s (training / inference) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['checkpoint']} | {r['weights']} | {r['norm']} | {_cell(r, 'training_bbox_ap')} | "
            f"{_cell(r, 'inference_bbox_ap')} | {_cell(r, 'training_segm_ap')} | {_cell(r, 'inference_segm_ap')} | "
            f"{r['passes']} | {r['training_s']:.0f} / {r['inference_s']:.0f} |"
        )
    by_norm = defaultdict(list)
    for r in rows:
        for task in ("bbox", "segm"):
            if f"training_{task}_ap" in r:
                by_norm[(r["norm"], task)].append(r[f"inference_{task}_ap"] - r[f"training_{task}_ap"])
    lines += ["", "| norm | AP | inference − training regime, mean (min, max) | checkpoints |", "|---|---|---:|---:|"]
    for (norm, task), diffs in sorted(by_norm.items()):
        lines.append(f"| {norm} | {'box' if task == 'bbox' else 'mask'} | "
                     f"{statistics.mean(diffs):+.2f} ({min(diffs):+.2f}, {max(diffs):+.2f}) | {len(diffs)} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for directory in args.checkpoints:
        rows.append(compare(directory, args.num_iter, args.max_passes, args.tolerance, args.seed, args.weights,
                            args.dataset))
        if args.json:  # after every checkpoint, so that a long run keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
