"""What a finished cell measured: detectron2's ``metrics.json`` and ``train_net``'s ``evaluation.json``.

``metrics.json`` is written by detectron2's ``JSONWriter``, one JSON object per line; after a
``--resume`` the replayed iterations appear twice, and the last record of an iteration wins.
"""
import json
import statistics
from pathlib import Path

from detectron2.config import get_cfg

from ..config.defaults import add_d2norm_config

__all__ = ["cell_schedule", "cell_solver", "evaluation_results", "read_metrics", "seconds_per_iter"]


def read_metrics(path):
    """``{iteration: record}`` of a ``metrics.json`` ({} if it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written while we read
            continue
        if "iteration" in record:
            records.setdefault(record["iteration"], {}).update(record)
    return records


def seconds_per_iter(records):
    """Median of detectron2's ``time`` (seconds per training iteration, data loading excluded)."""
    times = [r["time"] for r in records.values() if "time" in r]
    return round(statistics.median(times), 4) if times else None


def evaluation_results(directory):
    """``(box AP, box AP50, mask AP)`` from ``evaluation.json`` (None where not evaluated).

    That file holds what detectron2's ``DefaultTrainer.test`` returned: ``{task: metrics}`` for one
    test dataset, ``{dataset: {task: metrics}}`` for several (then the first dataset counts).
    """
    results = json.loads((Path(directory) / "evaluation.json").read_text())
    tasks = results if {"bbox", "segm"} & set(results) else next(iter(results.values()))
    bbox, segm = tasks.get("bbox", {}), tasks.get("segm", {})
    return bbox.get("AP"), bbox.get("AP50"), segm.get("AP")


def cell_schedule(config_file, overrides):
    """``(images per batch, iterations)`` of a config file with ``{key: value}`` overrides."""
    images, iterations, _ = cell_solver(config_file, overrides)
    return images, iterations


def cell_solver(config_file, overrides, workers=None):
    """``(images per batch, iterations, base LR)`` of a config file with ``{key: value}`` overrides,
    as training on ``workers`` processes runs it: rescaled like detectron2's ``auto_scale_workers``
    when ``SOLVER.REFERENCE_WORLD_SIZE`` is set and differs from ``workers``."""
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(config_file)
    for key in ("SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "SOLVER.BASE_LR", "SOLVER.REFERENCE_WORLD_SIZE"):
        if key in overrides:
            cfg.merge_from_list([key, str(overrides[key])])
    images, iterations, lr = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if workers and reference and reference != workers:
        scale = workers / reference
        images, iterations, lr = int(round(images * scale)), int(round(iterations / scale)), lr * scale
    return images, iterations, lr
