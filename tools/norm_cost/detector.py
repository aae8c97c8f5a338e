"""Detector benchmark: one Mask R-CNN R50-FPN training step per norm, on shared images and proposals."""
import statistics
from pathlib import Path

import torch
import torch.nn as nn

import d2norm
from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, NormLayer, PreciseBatchNorm2d

from .measure import progress, ratios, step_memory, timed
from .variants import FLOOR, add_cbn_floor, skip_warmup, window_state_bytes

DEFAULT_DETECTOR_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "CBN" / "mask_rcnn_R_50_FPN_1x_bn.yaml"
NORM_TYPES = {
    "BN": nn.BatchNorm2d, "PreciseBN": PreciseBatchNorm2d, "CBN": CrossIterationBatchNorm2d,
    "MABN": MovingAverageBatchNorm2d,
}


def build_detector(variant, args, device):
    """Mask R-CNN with ``variant``'s norm in the FPN and heads (``FLOOR``: BN plus CBN's extra pass)."""
    from detectron2.config import get_cfg

    from d2norm.modeling.build import build_model

    norm = "BN" if variant == FLOOR else variant
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(str(args.detector_config))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device), "MODEL.MASK_ON", True,
        "MODEL.FPN.NORM", norm, "MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.ROI_MASK_HEAD.NORM", norm,
        "D2NORM.CBN.BURNIN_ITERS", 0, *args.detector_opts,
    ])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if variant == FLOOR:
        add_cbn_floor(model)
    skip_warmup(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.detector_lr, momentum=0.9)
    return cfg, model, optimizer


def synthetic_batch(size, num_images=2, objects=4, num_classes=80):
    """Noise images with ``objects`` random boxes each, box-shaped masks (BGR, 0-255, CHW)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    gen = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, size, size), generator=gen).float()
        lo = torch.randint(0, int(size * 0.6), (objects, 2), generator=gen).float()
        extent = torch.randint(int(size * 0.15), int(size * 0.4), (objects, 2), generator=gen).float()
        boxes = torch.cat([lo, (lo + extent).clamp(max=size - 1)], dim=1)
        masks = torch.zeros(objects, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (objects,), generator=gen)
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


def share_proposals(models):
    """Feed every model's ROI heads the proposals of the first model's first step (in place).

    Untrained RPNs propose different boxes for different norms, so the number of foreground RoIs,
    and with it the mask head's work, would differ between the variants; with shared proposals every
    variant samples from the same RoIs and only the norm's own cost differs. The RPN still runs
    (its cost and losses stay in the step)."""
    from detectron2.structures import Instances

    shared = []

    def replace(module, args, output):
        proposals, losses = output
        if not shared:
            shared.extend(proposals)  # detectron2's RPN returns them without gradient
        return [Instances(p.image_size, **p.get_fields()) for p in shared], losses

    for model in models:
        model.proposal_generator.register_forward_hook(replace)


def run_detector_benchmark(args, device):
    """One training step (forward, backward, SGD step) of Mask R-CNN per norm, interleaved, on the
    same images and proposals (:func:`share_proposals`)."""
    from detectron2.utils.events import EventStorage, get_event_storage

    norms = ("BN", "PreciseBN", FLOOR, "CBN", "MABN")
    progress(f"detector: building Mask R-CNN with {', '.join(norms)}")
    models = {norm: build_detector(norm, args, device) for norm in norms}
    share_proposals(model for _, model, _ in models.values())
    cfg = models["BN"][0]
    batch = synthetic_batch(args.detector_size, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)

    def step_of(model, optimizer):
        def forward():
            losses = model(batch)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite detector loss: { {k: float(v) for k, v in losses.items()} }")
            return loss

        def backward(loss):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return forward, backward

    steps = {norm: step_of(model, optimizer) for norm, (_, model, optimizer) in models.items()}
    times = {norm: [] for norm in norms}
    memory, foreground = {}, {}
    with EventStorage(0):  # detectron2's losses log into it
        rounds = args.detector_warmup + args.detector_steps
        for i in range(rounds):
            progress(f"detector: round {i + 1}/{rounds} ({'warm-up' if i < args.detector_warmup else 'measured'}), "
                     f"one training step each of {', '.join(norms)}")
            for norm, (forward, backward) in steps.items():
                seconds = timed(forward, backward, device)
                foreground[norm] = get_event_storage().history("roi_head/num_fg_samples").latest()
                if i >= args.detector_warmup:
                    times[norm].append(seconds)
        progress("detector: one more step each for peak memory")
        for norm, (forward, backward) in steps.items():
            memory[norm] = step_memory(forward, backward, device)
    results = {}
    for norm in norms:
        model = models[norm][1]
        results[norm] = {
            "time_s": statistics.median(times[norm]),
            "times_s": times[norm],
            "forward_bytes": memory[norm][0],
            "peak_bytes": memory[norm][1],
            "window_state_bytes": window_state_bytes(model),
            "norm_layers": sum(type(m) is NORM_TYPES.get(norm, nn.BatchNorm2d) for m in model.modules()),
            "foreground_rois_per_image": foreground[norm],
            "layers_past_warmup": sum(isinstance(m, NormLayer) and not m.in_warmup() for m in model.modules()),
        }
    return {
        "config": {
            "config_file": str(args.detector_config), "image_size": args.detector_size, "images": len(batch),
            "warmup_steps": args.detector_warmup, "measured_steps": args.detector_steps,
            "rois_per_image": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, "cbn_window": cfg.D2NORM.CBN.WINDOW,
            "sgd_lr": args.detector_lr, "opts": list(args.detector_opts),
        },
        "results": results,
        "ratios": {
            **{name + "/BN": ratios(results[name], results["BN"]) for name in norms if name != "BN"},
            f"CBN/{FLOOR}": ratios(results["CBN"], results[FLOOR]),
        },
    }
