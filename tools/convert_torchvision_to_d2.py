#!/usr/bin/env python3
"""Convert a torchvision-style ResNet checkpoint to detectron2 backbone names.

For ImageNet weights that are not MSRA ``R-50.pkl``: torchvision's ``resnet50`` and the MABN
authors' weight-centralised ``R50-wc.pth`` (torchvision layout, ``module.`` prefixes, MABN buffers
shaped (1, C, 1, 1)). Writes a ``.pkl`` that detectron2 loads with its name-matching heuristics.
torchvision's own weights need ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (stride on the 3x3 conv) and
its RGB pixel statistics (``INPUT.FORMAT RGB``, ``PIXEL_MEAN [123.675, 116.28, 103.53]``,
``PIXEL_STD [58.395, 57.12, 57.375]``); other sources keep the recipe they were trained with.

    python tools/convert_torchvision_to_d2.py R50-wc.pth pretrained/R50-wc.pkl
"""
import argparse
import pickle
import re

import torch

# Buffers of normalization layers that only make sense inside one training run.
_RUN_STATE = ("num_batches_tracked", "iters", "buffer_x2", "buffer_gz")


def convert_name(name):
    """torchvision ResNet parameter name -> detectron2 ResNet name, or None to drop it (fc, run state)."""
    name = re.sub(r"^(module\.)+", "", name)
    if name.startswith("fc.") or name.rsplit(".", 1)[-1] in _RUN_STATE:
        return None
    name = re.sub(r"^conv1\.", "stem.conv1.", name)
    name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
    name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
    name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
    name = name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return name


def convert_state_dict(state_dict):
    """Rename every tensor; per-channel norm buffers stored as (1, C, 1, 1) become (C,)."""
    converted = {}
    for name, value in state_dict.items():
        new_name = convert_name(name)
        if new_name is None:
            continue
        value = value.detach().cpu()
        if value.dim() == 4 and value.shape[0] == 1 and value.shape[2:] == (1, 1):
            value = value.reshape(-1)
        converted[new_name] = value.numpy()
    return converted


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="torchvision-style checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    args = parser.parse_args()
    loaded = torch.load(args.source, map_location="cpu", weights_only=False)
    state_dict = loaded.get("state_dict", loaded.get("model", loaded))
    model = convert_state_dict(state_dict)
    with open(args.output, "wb") as f:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, f)
    print(f"wrote {len(model)} tensors to {args.output}")


if __name__ == "__main__":
    main()
