#!/usr/bin/env python3
"""How stale is CBN's window? Train a detectron2 config with CBN layers and, every few iterations,
compare each layer's pooled past statistics with the true ones.

CBN (Yao et al. 2021, Eq. 6-9) estimates the statistics that a past batch *would have* under the
current weights by a first-order Taylor step in the conv weight that feeds the layer; the change of
everything upstream is ignored. This tool measures how good that estimate is during training: it
keeps the last k-1 batches, re-runs them through the current model (forward only, in the training
regime, all state restored afterwards) and compares, per CBN layer and per age a:

* compensated error: |mu_hat - mu| / sqrt(var) and |var_hat - var| / var, mu_hat/var_hat the
  Taylor-compensated entries CBN will pool at the next iteration (Eq. 7-8);
* raw error: the same with the uncompensated stored entries ("naive CBN");
* batch spread: the same distances between the current batch's statistics and the past batch's
  true ones, i.e. the sampling noise pooling is meant to average away.

Pooling helps while the compensated error stays well below the batch spread. Output: one JSON line
per probe (``window_error.jsonl``, medians over layers) and ``window_error.png``.

    python tools/cbn_window_error.py --config-file configs/study/mask_rcnn_R_18_FPN_shapes_scratch.yaml \\
        --iters 500 --probe-period 25 --output output/cbn_window MODEL.RESNETS.NORM CBN ...
"""
import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.solver import build_lr_scheduler
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

import d2norm  # noqa: F401  (registers the norm names)
from d2norm import add_d2norm_config, validate_d2norm_config
from d2norm.engine.solver import build_optimizer
from d2norm.layers import CrossIterationBatchNorm2d
from d2norm.modeling.build import build_model


def cbn_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]


def true_statistics(model, batches, layers):
    """``[{layer name: (mean, biased var)}]``, one dict per batch, of each CBN layer's input when the
    current model trains on ``batches`` (forward only, in the training regime: every CBN upstream
    normalises with its pooled window, as it would if the batch came now). Every buffer and the RNG
    are restored after each batch, so neither the window nor training is affected by the probe."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    found, current = [], {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().double()
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            current[name] = (mean, var)
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in layers]
    try:
        for batch in batches:
            current = {}
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                model(batch)
            found.append(current)
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    finally:
        for h in handles:
            h.remove()
    return found


def _relative_errors(mean_hat, var_hat, mean, var, eps):
    return ((mean_hat - mean).abs() / (var + eps).sqrt()).mean().item(), \
        ((var_hat - var).abs() / (var + eps)).mean().item()


def window_errors(layer, truth_by_age, current):
    """``{age: {"compensated": (mean err, var err), "raw": ..., "spread": ...}}`` of one CBN layer.

    ``truth_by_age[a - 1]`` is the layer's true (mean, var) on the batch of age a (1 = the last
    trained batch) under the current weights; ``current`` the same for the next batch."""
    mean_comp, var_comp, _ = (t.double() for t in layer.compensated_window())
    filled, slots = int(layer.history_length), layer.window - 1
    out = {}
    for age in range(1, min(filled, len(truth_by_age)) + 1):
        slot = (int(layer.history_next) - age) % slots
        mean, var = truth_by_age[age - 1]
        out[age] = {
            "compensated": _relative_errors(mean_comp[slot], var_comp[slot], mean, var, layer.eps),
            "raw": _relative_errors(layer.history_mean[slot].double(), layer.history_var[slot].double(),
                                    mean, var, layer.eps),
            "spread": _relative_errors(current[0], current[1], mean, var, layer.eps),
        }
    return out


def summarize(per_layer):
    """Medians over layers: ``{age: {kind: [mean err, var err]}}``."""
    ages = sorted({a for errors in per_layer.values() for a in errors})
    return {age: {kind: [statistics.median(e[age][kind][i] for e in per_layer.values() if age in e)
                         for i in range(2)] for kind in ("compensated", "raw", "spread")} for age in ages}


def probe(model, layers, past_batches, next_batch):
    """``{layer name: window_errors}`` of every CBN layer; ``past_batches`` newest first."""
    batches = list(past_batches) + [next_batch]
    truth = true_statistics(model, batches, layers)
    per_layer = {}
    for name, layer in layers:
        by_age = [truth[i][name] for i in range(len(past_batches))]  # age 1 = newest past batch
        per_layer[name] = window_errors(layer, by_age, truth[-1][name])
    return per_layer


def train_and_probe(cfg, iters, probe_period, output, log=lambda line: print(line, flush=True)):
    """Train ``iters`` iterations as detectron2's SimpleTrainer does, probing every ``probe_period``."""
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)
    model = build_model(cfg)
    model.train()
    layers = cbn_layers(model)
    if not layers:
        raise SystemExit("error: the config has no CBN layer (set MODEL.*.NORM to CBN)")
    window = layers[0][1].window
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    data = iter(build_detection_train_loader(cfg))
    past = collections.deque(maxlen=window - 1)
    output.mkdir(parents=True, exist_ok=True)
    records = []
    with open(output / "window_error.jsonl", "w") as f, EventStorage():
        batch = next(data)
        for iteration in range(iters):
            losses = model(batch)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            past.appendleft(batch)
            batch = next(data)
            if (iteration + 1) % probe_period == 0:
                per_layer = probe(model, layers, past, batch) if int(layers[0][1].history_length) else {}
                summary = summarize(per_layer) if per_layer else {}
                record = {"iteration": iteration + 1, "lr": optimizer.param_groups[0]["lr"],
                          "loss": loss.item(), "burning_in": not summary, "ages": summary,
                          "age1_mean_error_per_layer": {name: {kind: e[1][kind][0] for kind in e[1]}
                                                        for name, e in per_layer.items() if 1 in e}}
                f.write(json.dumps(record) + "\n")
                f.flush()
                records.append(record)
                if summary:
                    a1 = summary[1]
                    log(f"[cbn-window] iter {iteration + 1}: loss {loss.item():.3f}; age 1 mean error "
                        f"compensated {a1['compensated'][0]:.3f}, raw {a1['raw'][0]:.3f}, batch spread "
                        f"{a1['spread'][0]:.3f}")
                else:
                    log(f"[cbn-window] iter {iteration + 1}: loss {loss.item():.3f} (burn-in)")
    plot(records, output / "window_error.png")
    return records, model


def plot(records, path):
    """Median errors against iteration: solid compensated, dashed raw, one colour per age; black:
    the batch spread (age 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = [r for r in records if r["ages"]]
    if not probed:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, index, title in zip(axes, (0, 1), ("mean: |error| / std", "variance: |error| / var")):
        for age in sorted({a for r in probed for a in r["ages"]}):
            rows = [r for r in probed if age in r["ages"]]
            its = [r["iteration"] for r in rows]
            for kind, style in (("compensated", "-"), ("raw", "--")):
                ax.plot(its, [r["ages"][age][kind][index] for r in rows], color=f"C{age - 1}", ls=style,
                        label=f"age {age}: {kind}")
        ax.plot([r["iteration"] for r in probed], [r["ages"][1]["spread"][index] for r in probed],
                color="k", lw=2, label="batch spread")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"CBN window error, median over layers — {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, help="training iterations (default and maximum: SOLVER.MAX_ITER, "
                                                  "which sets the LR schedule)")
    parser.add_argument("--probe-period", type=int, default=25, help="probe every N iterations")
    parser.add_argument("--output", default="output/cbn_window")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    validate_d2norm_config(cfg)
    iters = args.iters or cfg.SOLVER.MAX_ITER
    if iters > cfg.SOLVER.MAX_ITER:
        raise SystemExit(f"error: --iters {iters} exceeds SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER}")
    records, _ = train_and_probe(cfg, iters, args.probe_period, Path(args.output))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
