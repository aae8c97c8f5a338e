#!/usr/bin/env python3
"""The same shifted-domain images predicted before and after label-free recalibration, one above
the other (``tools/predict.py --grid`` with each checkpoint).

    python benchmarks/domain_shift/make_picture.py --cell output/cluster_regime/mask_rcnn_R_18_FPN_finetune \\
        --variant BN --seed 1 --output benchmarks/domain_shift/predictions_BN_seed1.jpg
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", required=True, help="the study's config directory (<output>/<config stem>)")
    parser.add_argument("--variant", default="BN", help="trained variant (default BN)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dataset", default="d2norm_shapes_shifted_val", help="images to predict")
    parser.add_argument("--limit", type=int, default=8, help="first N images (default 8)")
    parser.add_argument("--output", required=True, help="image to write (.jpg or .png)")
    parser.add_argument("--width", type=int, default=1100, help="width of the written image in pixels")
    return parser.parse_args(argv)


def grid(config, weights, dataset, limit, path):
    subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), "--config-file", str(config),
                    "--weights", str(weights), "--dataset", dataset, "--limit", str(limit), "--grid", str(path),
                    "MODEL.DEVICE", "cpu"], check=True, cwd=REPO)
    return cv2.imread(str(path))


def titled(image, title):
    band = np.full((36, image.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(band, title, (8, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
    return np.concatenate([band, image])


def main(argv=None):
    args = parse_args(argv)
    cell = Path(args.cell)
    trained = cell / args.variant / f"seed{args.seed}"
    recalibrated = cell / f"{args.variant}@shifted+recalibrated" / f"seed{args.seed}" / "recalibrated.pth"
    for path in (trained / "model_final.pth", recalibrated):
        if not path.is_file():
            sys.exit(f"{path} does not exist: run benchmarks/domain_shift/study.yaml first")
    with tempfile.TemporaryDirectory() as tmp:
        config = trained / "config.yaml"
        before = grid(config, trained / "model_final.pth", args.dataset, args.limit, Path(tmp) / "a.png")
        after = grid(config, recalibrated, args.dataset, args.limit, Path(tmp) / "b.png")
    picture = np.concatenate([
        titled(before, f"{args.variant}, seed {args.seed}: source-domain statistics"),
        titled(after, f"{args.variant}, seed {args.seed}: statistics recalibrated on unlabeled shifted images"),
    ])
    height = round(picture.shape[0] * args.width / picture.shape[1])
    picture = cv2.resize(picture, (args.width, height), interpolation=cv2.INTER_AREA)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.output, picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(args.output)


if __name__ == "__main__":
    main()
