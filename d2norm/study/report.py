"""Aggregate study records: ``results.json``, a markdown table and PNG plots.

The table has one row per (config, variant): mean and sample standard deviation over seeds of box
and mask AP, the per-seed values, and the median seconds per iteration. With a study's ``gap``
(a per-worker and a synced variant), each config also gets the gate (is synced BN ahead by more
than the noise: twice the larger seed spread, or, paired by seed, twice the standard error of the
per-seed differences; :class:`Gate`) and every variant its distance from both, as a fraction of
the gap: 0 is per-worker BN, 1 is synced BN. Plots: final AP per variant with every
seed as a point (``final_ap.png``), the training loss against training images seen (``loss.png``;
images, not iterations, so a 16-image-batch variant lines up with 2-image ones) and, where cells
evaluated during training, box AP against iteration (``ap_curve.png``).
"""
import json
import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .matrix import GATE_RULES
from .metrics import read_metrics

__all__ = ["Gate", "aggregate", "gap_fractions", "markdown_table", "plot_ap_curve", "plot_final_ap", "plot_loss",
           "write_report"]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records):
    """``OrderedDict[(config, variant)] -> summary`` in the order the variants first appear."""
    groups = OrderedDict()
    for r in records:
        groups.setdefault((Path(r["config"]).stem, r["variant"]), []).append(r)
    summary = OrderedDict()
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        box_mean, box_std = _mean_std(r["box_ap"] for r in rows)
        mask_mean, mask_std = _mean_std(r["mask_ap"] for r in rows)
        times = [r["seconds_per_iter"] for r in rows if r["seconds_per_iter"] is not None]
        summary[key] = {
            "seeds": [r["seed"] for r in rows],
            "box_ap": [r["box_ap"] for r in rows], "box_mean": box_mean, "box_std": box_std,
            "mask_ap": [r["mask_ap"] for r in rows], "mask_mean": mask_mean, "mask_std": mask_std,
            "images_per_batch": rows[0]["images_per_batch"], "iterations": rows[0]["iterations"],
            "seconds_per_iter": statistics.median(times) if times else None,
        }
    return summary


def _fmt(mean, std):
    return "—" if mean is None else f"{mean:.1f} ± {std:.1f}"


def _values(values):
    return ", ".join("—" if v is None else f"{v:.1f}" for v in values)


@dataclass(frozen=True)
class Gate:
    """The gate of one config and task: is synced BN ahead of per-worker BN by more than the noise?

    ``size`` is the gap SyncBN − BN and ``threshold`` the noise it must exceed:

    - rule ``spread``: the difference of the means against twice the larger seed spread (sample
      standard deviation over seeds) of the two variants;
    - rule ``paired``: the mean of the per-seed differences (the same seed gives both variants the
      same data order and head initialisation) against twice its standard error,
      ``2 sd(d) / sqrt(n)``, over the ``n`` seeds both variants have.

    ``fractions`` places every variant of the config on the gap (0 per-worker, 1 synced, from the
    means); ``seeds`` is the fewest seeds of the two (``paired``: the seeds they share).
    """

    rule: str
    size: float
    threshold: float
    fractions: dict
    seeds: int

    @property
    def decided(self):
        return self.seeds >= 2

    @property
    def passed(self):
        return self.decided and self.size > self.threshold


def _paired(low, high, task):
    mine = dict(zip(low["seeds"], low[f"{task}_ap"]))
    differences = [ap - mine[seed] for seed, ap in zip(high["seeds"], high[f"{task}_ap"])
                   if seed in mine and ap is not None and mine[seed] is not None]
    if len(differences) < 2:
        return (statistics.fmean(differences) if differences else 0.0), 0.0, len(differences)
    return (statistics.fmean(differences), 2 * statistics.stdev(differences) / math.sqrt(len(differences)),
            len(differences))


def gap_fractions(summary, gap):
    """``{config: {"box"/"mask": Gate}}`` for every config with both variants of ``gap``
    (``{"per_worker": V1, "synced": V2, "gate": rule}``, rule ``spread`` when absent; see :class:`Gate`);
    a fraction is ``(AP - per-worker) / (synced - per-worker)`` of the means."""
    rule = gap.get("gate", "spread")
    if rule not in GATE_RULES:
        raise ValueError(f"gap.gate = {rule!r}: the gate rule must be one of {list(GATE_RULES)}")
    out = {}
    for config in dict.fromkeys(c for c, _ in summary):
        low, high = summary.get((config, gap["per_worker"])), summary.get((config, gap["synced"]))
        if low is None or high is None:
            continue
        out[config] = {}
        for task in ("box", "mask"):
            if low[f"{task}_mean"] is None or high[f"{task}_mean"] is None:
                continue
            means = high[f"{task}_mean"] - low[f"{task}_mean"]
            fractions = {v: (s[f"{task}_mean"] - low[f"{task}_mean"]) / means
                         for (c, v), s in summary.items() if c == config and s[f"{task}_mean"] is not None and means}
            if rule == "paired":
                size, threshold, seeds = _paired(low, high, task)
            else:
                size, threshold = means, 2 * max(low[f"{task}_std"], high[f"{task}_std"])
                seeds = min(len(low["seeds"]), len(high["seeds"]))
            out[config][task] = Gate(rule, size, threshold, fractions, seeds)
    return out


def _fraction(gaps, config, task, variant):
    gate = gaps.get(config, {}).get(task)
    return "—" if gate is None or variant not in gate.fractions else f"{gate.fractions[variant] + 0.0:.2f}"


_NOISE = {"spread": "twice the larger seed spread", "paired": "twice its standard error"}
_GAP = {"spread": "gap", "paired": "mean per-seed gap"}


def markdown_table(summary, gap=None):
    """The summary as markdown; with ``gap``, the gate per config and each variant's fraction of it."""
    gaps = gap_fractions(summary, gap) if gap else {}
    extra = " box: fraction of gap | mask: fraction of gap |" if gaps else ""
    lines = ["| config | variant | images/batch | iterations | seeds | box AP | box AP per seed | "
             "mask AP | mask AP per seed | s/iter |" + extra,
             "|---|---|---:|---:|---:|---:|---|---:|---|---:|" + ("---:|---:|" if gaps else "")]
    for (config, variant), s in summary.items():
        sec = "—" if s["seconds_per_iter"] is None else f"{s['seconds_per_iter']:.2f}"
        row = (f"| {config} | {variant} | {s['images_per_batch']} | {s['iterations']} | {len(s['seeds'])} | "
               f"{_fmt(s['box_mean'], s['box_std'])} | {_values(s['box_ap'])} | "
               f"{_fmt(s['mask_mean'], s['mask_std'])} | {_values(s['mask_ap'])} | {sec} |")
        if gaps:
            row += f" {_fraction(gaps, config, 'box', variant)} | {_fraction(gaps, config, 'mask', variant)} |"
        lines.append(row)
    for config, tasks in gaps.items():
        lines.append("")
        for task, gate in tasks.items():
            if not gate.decided:
                verdict = ("not decided: a spread needs at least 2 seeds of each" if gate.rule == "spread"
                           else "not decided: a paired gate needs at least 2 seeds of both")
            elif gate.passed:
                verdict = f"larger: the regime shows the problem ({gap['synced']} ahead)"
            else:
                verdict = "not larger"
            lines.append(f"- {config}, {task} AP: {_GAP[gate.rule]} {gap['synced']} − {gap['per_worker']} = "
                         f"{gate.size:+.1f} over {gate.seeds} seeds; {_NOISE[gate.rule]} = {gate.threshold:.1f}; "
                         f"{verdict}.")
    if gaps:
        lines.append("")
        lines.append(f"Fraction of gap: (AP − {gap['per_worker']}) / ({gap['synced']} − {gap['per_worker']}) "
                     f"of the means; 0 is {gap['per_worker']}, 1 is {gap['synced']}.")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_final_ap(summary, path):
    """Mean AP per variant (bars) with each seed's AP (points), box and mask side by side."""
    plt = _pyplot()
    names = [f"{variant}" if len({c for c, _ in summary}) == 1 else f"{config}\n{variant}"
             for config, variant in summary]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.3 * len(names)) * 2, 4.5), squeeze=False)
    for ax, task, title in zip(axes[0], ("box", "mask"), ("box AP", "mask AP")):
        for x, s in enumerate(summary.values()):
            values = [v for v in s[f"{task}_ap"] if v is not None]
            if not values:
                continue
            ax.bar(x, s[f"{task}_mean"], color="C0", alpha=0.35, width=0.6)
            ax.errorbar(x, s[f"{task}_mean"], yerr=s[f"{task}_std"], color="C0", capsize=4)
            ax.scatter([x + 0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))], values,
                       color="k", s=14, zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right")
        ax.set_ylabel(f"COCO {title}")
        ax.set_title(f"{title}: mean ± sd over seeds (points: seeds)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(records, directory_of, path, smoothing=10):
    """Training loss (moving average of ``smoothing`` logged points) against images seen, one line
    per seed, one colour per trained variant. ``directory_of(record)`` is the cell's directory."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = {}  # one colour and one legend entry per (config, variant)
    for r in records:
        if r.get("evaluates"):
            continue
        metrics = read_metrics(Path(directory_of(r)) / "metrics.json")
        points = sorted((i, m["total_loss"]) for i, m in metrics.items() if "total_loss" in m)
        if not points:
            continue
        key = (Path(r["config"]).stem, r["variant"])
        label = None if key in colours else r["variant"]
        colour = colours.setdefault(key, f"C{len(colours) % 10}")
        ax.plot([(i + 1) * r["images_per_batch"] for i, _ in points], _smooth([v for _, v in points], smoothing),
                color=colour, alpha=0.8, lw=1, label=label)
    ax.set_xlabel("training images seen")
    ax.set_ylabel("total loss (moving average)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Training loss per variant (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ap_curve(records, directory_of, path):
    """Box AP of the evaluations during training against iteration, one panel per config, one line
    per seed, one colour per trained variant; False (nothing written) when no cell evaluated early."""
    curves = []
    for r in records:
        if r.get("evaluates"):
            continue
        metrics = read_metrics(Path(directory_of(r)) / "metrics.json")
        points = sorted((i + 1, m["bbox/AP"]) for i, m in metrics.items() if "bbox/AP" in m)
        if len(points) > 1:
            curves.append((Path(r["config"]).stem, r["variant"], points))
    if not curves:
        return False
    plt = _pyplot()
    configs = list(dict.fromkeys(c for c, _, _ in curves))
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 4.5), squeeze=False)
    colours = {}
    for config, variant, points in curves:
        ax = axes[0][configs.index(config)]
        label = None if variant in colours else variant
        colour = colours.setdefault(variant, f"C{len(colours) % 10}")
        ax.plot(*zip(*points), color=colour, alpha=0.8, lw=1, marker="o", ms=3, label=label)
    for ax, config in zip(axes[0], configs):
        ax.set_title(config)
        ax.set_xlabel("iteration")
        ax.set_ylabel("box AP")
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(records, results_dir, directory_of, gap=None):
    """Write ``results.json``, ``table.md``, ``final_ap.png``, ``loss.png`` and (when cells evaluated
    during training) ``ap_curve.png`` into ``results_dir``; ``gap`` as in :func:`markdown_table`."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    summary = aggregate(records)
    table = markdown_table(summary, gap)
    (results_dir / "table.md").write_text(table)
    plot_final_ap(summary, results_dir / "final_ap.png")
    plot_loss(records, directory_of, results_dir / "loss.png")
    plot_ap_curve(records, directory_of, results_dir / "ap_curve.png")
    return table
