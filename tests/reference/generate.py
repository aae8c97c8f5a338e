"""Recompute the reference trajectories of this directory with the papers' official layers.

The official files are loaded from clones of their repositories, unmodified:

- CBN: ``mmdet/models/utils/CBN.py`` (``CBatchNorm2d``) of https://github.com/Howal/Cross-iterationBatchNorm,
  commit f6d35301789c96e52699a9cbc8d2de8681547770;
- MABN: ``MABN.py`` (``MABN2d``, ``CenConv2d``) of https://github.com/megvii-model/MABN,
  commit 995e8f5af82ced88394166a322766a5378ece969.

Usage (float64, CPU; the official CBN allocates one tensor with ``.cuda()``, which runs on the CPU
here)::

    git clone https://github.com/Howal/Cross-iterationBatchNorm /tmp/cbn && git -C /tmp/cbn checkout f6d3530
    git clone https://github.com/megvii-model/MABN /tmp/mabn && git -C /tmp/mabn checkout 995e8f5
    python tests/reference/generate.py --cbn-repo /tmp/cbn --mabn-repo /tmp/mabn --check   # compare
    python tests/reference/generate.py --cbn-repo /tmp/cbn --mabn-repo /tmp/mabn           # rewrite

Each case of ``cases.json`` replays the scenario of ``README.md`` on the inputs stored in its
``.npz`` (``x``, ``R``, ``conv_weight0``, ``gamma0``, ``beta0``, MABN's ``x_eval``) and records the
official layer's outputs; ``--check`` reports the largest difference to the stored outputs instead
of writing.
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).parent


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_cbn(repo, case):
    module = load_module(Path(repo) / "mmdet/models/utils/CBN.py", "official_cbn")
    cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *args, **kwargs: self  # its one .cuda() call
    try:
        layer = module.CBatchNorm2d(case["Cout"], eps=case["eps"], momentum=case["momentum"],
                                    buffer_num=case["official_buffer_num"], burnin=case["burnin"],
                                    out_p=case["eps_inside_sqrt"])
    finally:
        torch.Tensor.cuda = cuda
    return layer.double()


def run_cbn(repo, case, inputs):
    layer = official_cbn(repo, case)
    weight = nn.Parameter(torch.from_numpy(inputs["conv_weight0"]).clone())
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(inputs["gamma0"]))
        layer.bias.copy_(torch.from_numpy(inputs["beta0"]))
    record = {key: [] for key in ("y", "grad_x", "grad_conv_weight", "grad_gamma", "grad_beta", "running_mean",
                                  "running_var")}
    for t in range(case["T"]):
        x = torch.from_numpy(inputs["x"][t]).clone().requires_grad_()
        conv = F.conv2d(x, weight, None, case["stride"], case["padding"])
        y = layer(conv, weight)
        grads = torch.autograd.grad((y * torch.from_numpy(inputs["R"][t])).sum(), (x, weight, layer.weight, layer.bias))
        for key, value in zip(record, (y, *grads, layer.running_mean, layer.running_var)):
            record[key].append(value.detach().clone())
        with torch.no_grad():
            for param, grad in zip((weight, layer.weight, layer.bias), grads[1:]):
                param -= case["lr"] * grad
    return {key: torch.stack(values).numpy() for key, values in record.items()}


def run_mabn(repo, case, inputs):
    module = load_module(Path(repo) / "MABN.py", "official_mabn")
    k = case["kernel"]
    conv = module.CenConv2d(case["Cin"], case["Cout"], kernel_size=k, padding=case["padding"]).double()
    norm = module.MABN2d(case["Cout"], B=1, real_B=case["buffer_size"], eps=case["eps"], momentum=case["momentum"],
                         warmup_iters=case["warmup_iters"]).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(inputs["conv_weight0"]))
        norm.weight.copy_(torch.from_numpy(inputs["gamma0"]))
        norm.bias.copy_(torch.from_numpy(inputs["beta0"]))
    params = (conv.weight, norm.weight, norm.bias)
    record = {key: [] for key in ("y", "grad_x", "grad_conv_weight", "grad_gamma", "grad_beta", "running_var")}
    for t in range(case["T"]):
        x = torch.from_numpy(inputs["x"][t]).clone().requires_grad_()
        y = norm(conv(x))
        grads = torch.autograd.grad((y * torch.from_numpy(inputs["R"][t])).sum(), (x, *params))
        for key, value in zip(record, (y, *grads, norm.running_var.reshape(-1))):
            record[key].append(value.detach().clone())
        with torch.no_grad():
            for param, grad in zip(params, grads[1:]):
                param -= case["lr"] * grad
    outputs = {key: torch.stack(values).numpy() for key, values in record.items()}
    norm.eval()
    with torch.no_grad():
        outputs["y_eval"] = norm(conv(torch.from_numpy(inputs["x_eval"]))).numpy()
    outputs["conv_weight_final"] = conv.weight.detach().numpy().copy()
    return outputs


INPUTS = ("x", "R", "conv_weight0", "gamma0", "beta0", "x_eval")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cbn-repo", required=True, help="clone of Howal/Cross-iterationBatchNorm")
    parser.add_argument("--mabn-repo", required=True, help="clone of megvii-model/MABN")
    parser.add_argument("--check", action="store_true", help="compare with the stored outputs, write nothing")
    args = parser.parse_args(argv)
    cases = json.loads((HERE / "cases.json").read_text())
    worst = 0.0
    for name, case in cases.items():
        stored = dict(np.load(HERE / f"{name}.npz"))
        inputs = {key: stored[key] for key in INPUTS if key in stored}
        run = run_cbn if case["method"] == "CBN" else run_mabn
        outputs = run(args.cbn_repo if case["method"] == "CBN" else args.mabn_repo, case, inputs)
        if args.check:
            for key, value in outputs.items():
                scale = max(np.abs(stored[key]).max(), 1e-300)
                difference = np.abs(value - stored[key]).max() / scale
                worst = max(worst, difference)
                print(f"{name}.{key}: largest difference {difference:.2e} (relative to the largest value)")
        else:
            np.savez(HERE / f"{name}.npz", **inputs, **outputs)
            print(f"wrote {name}.npz")
    if args.check:
        print(f"largest relative difference over all cases: {worst:.2e}")
        return 0 if worst < 1e-9 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
