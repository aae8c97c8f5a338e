#!/usr/bin/env python3
"""Plot the norm statistics monitor's output (``D2NORM.MONITOR``) from OUTPUT_DIR/metrics.json.

Writes, next to metrics.json (or to ``--out-dir``):

- ``norm_stats_parts.png``: one panel per metric (train/test inconsistency, CBN window, MABN
  renorm, backward statistics, recalibration shift), one curve per model part (backbone, FPN,
  heads) over iterations;
- ``norm_stats_layers.png``: heat map of every layer's train/test inconsistency over iterations;
- ``norm_stats_backward_layers.png``: heat map of every layer's spread of the backward statistic ψ
  across iterations (``backward_psi_spread``), when the run recorded it.

    python tools/plot_norm_stats.py output/demo
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402
import yaml  # noqa: E402

PART_ORDER = ("backbone", "fpn", "heads", "other")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a training OUTPUT_DIR with metrics.json")
    parser.add_argument("--out-dir", help="where to write the PNGs (default: OUTPUT_DIR)")
    return parser.parse_args(argv)


LAYER_METRICS = {"inconsistency": ("norm_stats_layers.png", "train/test inconsistency per layer"),
                 "backward_psi_spread": ("norm_stats_backward_layers.png",
                                         "spread of the backward statistic ψ across iterations, per layer")}


def read_norm_metrics(metrics_file, layer_metric="inconsistency"):
    """``(parts, layers)``: ``parts[metric][part]`` and ``layers[name]`` (of ``layer_metric``) map
    iteration -> value."""
    parts = defaultdict(lambda: defaultdict(dict))
    layers = defaultdict(dict)
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        iteration = record.get("iteration")
        for key, value in record.items():
            fields = key.split("/")
            if fields[0] == "norm" and len(fields) == 3:
                parts[fields[2]][fields[1]][iteration] = value
            elif fields[0] == "norm_layer" and fields[-1] == layer_metric:
                layers["/".join(fields[1:-1])][iteration] = value
    return parts, layers


def monitor_enabled(output_dir):
    """``D2NORM.MONITOR.ENABLED`` of the run's config.yaml (False without one)."""
    config_file = Path(output_dir) / "config.yaml"
    if not config_file.is_file():
        return False
    cfg = yaml.safe_load(config_file.read_text()) or {}
    return bool(cfg.get("D2NORM", {}).get("MONITOR", {}).get("ENABLED", False))


def plot_parts(parts, path):
    metrics = sorted(parts, key=lambda m: (m != "inconsistency", m))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for part in sorted(parts[metric], key=lambda p: PART_ORDER.index(p) if p in PART_ORDER else 99):
            points = sorted(parts[metric][part].items())
            ax.plot([i for i, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None,
                    label=part)
        ax.set_title(metric)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layers(layers, path, title=LAYER_METRICS["inconsistency"][1]):
    names = list(layers)
    iterations = sorted({i for values in layers.values() for i in values})
    grid = np.full((len(names), len(iterations)), np.nan)
    column = {i: c for c, i in enumerate(iterations)}
    for row, name in enumerate(names):
        for iteration, value in layers[name].items():
            grid[row, column[iteration]] = value
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * len(names)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(iterations) - 1, min(len(iterations), 10)).round().astype(int)
    ax.set_xticks(ticks, [iterations[t] for t in ticks])
    ax.set_xlabel("iteration")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir or args.output_dir)
    metrics_file = Path(args.output_dir) / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{metrics_file} does not exist: pass the OUTPUT_DIR of a training run.")
    parts, _ = read_norm_metrics(metrics_file)
    if not parts:
        if monitor_enabled(args.output_dir):  # e.g. the GroupNorm demo: nothing to monitor
            print(f"{args.output_dir}: the model has no BN/CBN/MABN/PreciseBN layer; no norm statistics to plot.")
            return []
        raise SystemExit(
            f"{metrics_file} has no norm statistics (keys 'norm/<part>/<metric>'): train with "
            "D2NORM.MONITOR.ENABLED True."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "norm_stats_parts.png"]
    plot_parts(parts, written[0])
    for metric, (name, title) in LAYER_METRICS.items():
        layers = read_norm_metrics(metrics_file, metric)[1]
        if layers:
            written.append(out_dir / name)
            plot_layers(layers, written[-1], title)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
