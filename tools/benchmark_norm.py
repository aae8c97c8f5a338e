#!/usr/bin/env python
"""Speed and memory of the d2norm layers next to BatchNorm, in one run (``make bench``).

1. A conv3x3 + norm block, forward + backward per step, at each ``--shapes`` C x H (default
   256 x 32 and 64 x 128): ``nn.BatchNorm2d``, d2norm's PreciseBN, CBN (window k, past burn-in,
   bound to its conv by ``d2norm.prepare_model``), MABN (past warm-up, weight-centralised conv), an
   official-style CBN written here after Howal/Cross-iterationBatchNorm's CBN.py (two
   ``autograd.grad`` calls per step; a weight copy and two weight-sized gradients kept per past
   iteration), and "CBN floor": BN plus the one thing CBN cannot avoid, a second weight-gradient
   pass of the conv (d var/dW, CBN paper Sec. 3.3) computed in the conv's forward.
2. One Mask R-CNN R50-FPN training step (forward, backward, SGD step) on a synthetic batch of two
   images, with BN, PreciseBN, CBN, MABN or the CBN floor in the FPN, the 4conv1fc box head and the
   mask head.

Measured steps run in rounds, each round one step of every variant in turn; times are medians over
rounds, and time ratios medians of the per-round ratios, so a change in machine load between rounds
cancels out. Peak memory is measured on one extra step per variant: the
most tensor memory allocated at once above what was allocated when the step began
(``torch.cuda.max_memory_allocated`` on CUDA; on CPU, the live storages of every tensor that an
aten op returns, tracked by a dispatch mode, so an op's internal scratch space is not counted).
Prints markdown tables of absolute numbers and ratios to BN; ``--json PATH`` also writes them.

The pieces live in ``tools/norm_cost/``: ``measure.py`` (time, memory, ratios), ``official_cbn.py``
(the official-style baseline), ``variants.py`` (CBN floor, warm-up skipping, window state),
``blocks.py`` and ``detector.py`` (the two benchmarks) and ``report.py`` (the markdown).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/norm_cost, next to this script

from norm_cost.blocks import run_block_benchmark
from norm_cost.detector import DEFAULT_DETECTOR_CONFIG, run_detector_benchmark
from norm_cost.measure import environment, memory_method
from norm_cost.report import markdown


def _block_shape(text):
    """``"256x32"`` -> (256, 32)."""
    try:
        channels, size = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"block shapes are CxS, e.g. 256x32 (C channels, SxS pixels), got {text!r}") from None
    return channels, size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=2, help="block: N (default: 2)")
    p.add_argument("--shapes", nargs="+", type=_block_shape, default=None, metavar="CxS",
                   help="block: C_in = C_out and H = W of each block benchmark "
                        "(default: 256x32 64x128 on CPU, 256x64 64x256 on CUDA)")
    p.add_argument("--window", type=int, default=8, help="CBN window k, ours and official-style (default: 8)")
    p.add_argument("--warmup", type=int, default=None, help="block: warm-up steps (default: the window, so it fills)")
    p.add_argument("--repeats", type=int, default=10, help="block: measured steps (default: 10)")
    p.add_argument("--skip-detector", action="store_true", help="only the block benchmark")
    p.add_argument("--detector-config", type=Path, default=DEFAULT_DETECTOR_CONFIG,
                   help="Mask R-CNN base config (default: configs/CBN/mask_rcnn_R_50_FPN_1x_bn.yaml)")
    p.add_argument("--detector-size", type=int, default=320, help="synthetic image side in pixels (default: 320)")
    p.add_argument("--detector-warmup", type=int, default=2, help="detector warm-up steps (default: 2)")
    p.add_argument("--detector-steps", type=int, default=3, help="detector measured steps (default: 3)")
    p.add_argument("--detector-lr", type=float, default=1e-3, help="SGD learning rate of the detector (default: 1e-3)")
    p.add_argument("--detector-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="extra detector config overrides, e.g. MODEL.RESNETS.DEPTH 101")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.shapes is None:
        args.shapes = [(256, 64), (64, 256)] if device.type == "cuda" else [(256, 32), (64, 128)]
    if args.warmup is None:
        args.warmup = args.window
    if min(args.repeats, args.detector_steps) < 1 or args.window < 2:
        p.error("--repeats and --detector-steps must be >= 1 and --window >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"environment": environment(device), "memory_method": memory_method(device)}
    report["blocks"] = [run_block_benchmark(args, channels, size, device) for channels, size in args.shapes]
    report["detector"] = None if args.skip_detector else run_detector_benchmark(args, device)
    report["load_average_after"] = list(os.getloadavg())
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
