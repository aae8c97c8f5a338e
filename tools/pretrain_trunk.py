#!/usr/bin/env python3
"""Pretrain the cluster-regime study's ResNet-18 trunk on procedural classification images.

    python tools/pretrain_trunk.py            # writes pretrained/R-18_shapes_cls.pth (+ .json)

The fine-tune configs (``configs/cluster_regime/*finetune*.yaml``) load that file as
``MODEL.WEIGHTS`` with frozen BN statistics, as detectron2 loads ImageNet weights. The result is
cached: a second run with the same settings only checks the file. An interrupted run resumes.
See :mod:`d2norm.engine.pretrain`.
"""
import argparse
import dataclasses

import torch

from d2norm.engine.pretrain import PretrainSettings, ensure_pretrained_trunk

DEFAULT_OUTPUT = "pretrained/R-18_shapes_cls.pth"


def main(argv=None):
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="checkpoint path (default %(default)s)")
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dataclasses.replace(defaults, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed)
    manifest = ensure_pretrained_trunk(args.output, settings, log=lambda line: print(line, flush=True))
    print(f"{args.output}: held-out accuracy {manifest['accuracy']:.3f}, sha256 {manifest['sha256'][:16]}")


if __name__ == "__main__":
    main()
