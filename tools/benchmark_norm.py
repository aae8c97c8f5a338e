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
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.grad import conv2d_weight
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import d2norm
from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.layers.weight_centralization import is_weight_centralized
from d2norm.modeling.binding import conv_norm_pairs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DETECTOR_CONFIG = REPO / "configs" / "CBN" / "mask_rcnn_R_50_FPN_1x_bn.yaml"
MIB = 2.0**20
NORM_TYPES = {
    "BN": nn.BatchNorm2d, "PreciseBN": PreciseBatchNorm2d, "CBN": CrossIterationBatchNorm2d,
    "MABN": MovingAverageBatchNorm2d,
}
FLOOR = "CBN floor"  # BN + one more conv weight-gradient per norm-fed conv


# ---------------------------------------------------------------------------------------- memory
class _LiveStorages(TorchDispatchMode):
    """Running total and peak of the bytes held by storages that ops create inside the mode.

    An op output that aliases one of its inputs (views, in-place ops) allocates nothing; a storage
    leaves the total when it is freed (weak reference callback).
    """

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, key, _ref):
        self.current -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = (size, weakref.ref(storage, lambda ref, key=key: self._release(key, ref)))
            self.current += size
            self.peak = max(self.peak, self.current)
        return out


def step_memory(forward, backward, device):
    """Run ``backward(forward())`` once. Returns bytes above the allocation at the start of the step:
    ``(held after forward, peak)``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = forward()
        torch.cuda.synchronize(device)
        after_forward = torch.cuda.memory_allocated(device) - start
        backward(out)
        del out
        torch.cuda.synchronize(device)
        return after_forward, torch.cuda.max_memory_allocated(device) - start
    with _LiveStorages() as tracker:
        out = forward()
        after_forward = tracker.current
        backward(out)
        del out
    return after_forward, tracker.peak


def memory_method(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus the allocation at step start"
    return "peak of live tensor storages created during the step (TorchDispatchMode tracker; op scratch space excluded)"


def timed(forward, backward, device):
    """Wall-clock seconds of ``backward(forward())``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    backward(forward())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def progress(message):
    """One progress line on stderr (the report itself goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------- official-style CBN
class OfficialStyleCrossIterationBN(nn.Module):
    """Baseline with the official CBN's bookkeeping (Howal/Cross-iterationBatchNorm CBN.py), for cost comparison.

    Each training step takes d mean/dW and d mean(x²)/dW by two ``torch.autograd.grad`` calls on the
    retained graph, compensates every stored iteration by ``<G_old, W_t - W_old>_c``, pools the
    valid entries, and prepends (mean, mean(x²), both gradients, a copy of W_t) to Python lists of
    at most ``window - 1`` entries. Eps inside the square root, as d2norm's CBN.
    """

    def __init__(self, num_features, window=8, momentum=0.1, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.past, self.momentum, self.eps = window - 1, momentum, eps
        self.history = []  # newest first: (mean, mean_sq, d mean/dW, d mean_sq/dW, W copy)

    def forward(self, x, conv_weight):
        mean, mean_sq = x.mean((0, 2, 3)), x.square().mean((0, 2, 3))
        ones = torch.ones_like(mean)
        (mean_grad,) = torch.autograd.grad(mean, conv_weight, ones, retain_graph=True)
        (mean_sq_grad,) = torch.autograd.grad(mean_sq, conv_weight, ones, retain_graph=True)
        w = conv_weight.detach()
        means, mean_sqs = [mean], [mean_sq]
        for old_mean, old_mean_sq, old_mean_grad, old_mean_sq_grad, old_w in self.history:
            delta = w - old_w
            means.append(old_mean + (old_mean_grad * delta).flatten(1).sum(1))
            mean_sqs.append(old_mean_sq + (old_mean_sq_grad * delta).flatten(1).sum(1))
        means, mean_sqs = torch.stack(means), torch.stack(mean_sqs)
        valid = mean_sqs - means.square() >= 0
        count = valid.sum(0)
        pooled_mean = torch.where(valid, means, 0).sum(0) / count
        pooled_var = torch.where(valid, mean_sqs, 0).sum(0) / count - pooled_mean.square()
        self.history.insert(0, (mean.detach(), mean_sq.detach(), mean_grad, mean_sq_grad, w.clone()))
        del self.history[self.past:]
        with torch.no_grad():
            samples = x.numel() // x.shape[1]
            unbiased_var = (mean_sq - mean.square()) * (samples / (samples - 1))
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased_var, self.momentum)
        scale = self.weight * torch.rsqrt(pooled_var + self.eps)
        return (x - pooled_mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]

    def window_state_bytes(self):
        return tensor_bytes(t for entry in self.history for t in entry)


class _ConvOfficialStyleCBN(nn.Module):
    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x):
        return self.norm(self.conv(x), self.conv.weight)


# -------------------------------------------------------------------------------- block benchmark
def window_state_bytes(model):
    """Bytes of the cross-iteration state: CBN history buffers, MABN ring buffers, official lists."""
    total = 0
    for m in model.modules():
        if isinstance(m, CrossIterationBatchNorm2d):
            total += tensor_bytes(b for name, b in m.named_buffers(recurse=False) if name.startswith("history_"))
        elif isinstance(m, MovingAverageBatchNorm2d):
            total += tensor_bytes([m.buffer_x2, m.buffer_gz])
        elif isinstance(m, OfficialStyleCrossIterationBN):
            total += m.window_state_bytes()
    return total


def skip_mabn_warmup(model):
    """Advance every MABN counter to the end of warm-up and the renorm-free phase, so the next step
    uses the moving averages and the clipped renorm factor (the schedule is evaluated on the device,
    so step cost does not depend on the phase)."""
    for m in model.modules():
        if isinstance(m, MovingAverageBatchNorm2d):
            m.iters.fill_(max(m.iters.item(), m.warmup_iters, m.renorm_free_iters, m.buffer_size))


def _weight_gradient_of_output(conv, args, output):
    """The extra work CBN cannot avoid: d var/dW needs a weight-gradient pass of the conv with its
    own output as ``grad_output`` (CBN paper, Sec. 3.3; see ``conv_statistic_gradients``)."""
    if conv.training and torch.is_grad_enabled():
        with torch.no_grad():
            conv2d_weight(args[0], conv.weight.shape, output, conv.stride, conv.padding, conv.dilation, conv.groups)


def add_cbn_floor(model, example_inputs=None):
    """Give every conv that feeds a BatchNorm of ``model`` the weight-gradient pass CBN adds (in place)."""
    pairs = conv_norm_pairs(model, example_inputs, norm_types=(nn.BatchNorm2d,))
    for conv, _ in pairs:
        conv.register_forward_hook(_weight_gradient_of_output)
    return model


def build_blocks(channels, window, device):
    def conv():
        torch.manual_seed(0)
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    example = (torch.zeros(2, channels, 4, 4),)
    blocks = {
        "BN": nn.Sequential(conv(), nn.BatchNorm2d(channels)),
        "PreciseBN": nn.Sequential(conv(), PreciseBatchNorm2d(channels)),
        FLOOR: add_cbn_floor(nn.Sequential(conv(), nn.BatchNorm2d(channels)), example),
        "CBN": d2norm.prepare_model(nn.Sequential(conv(), CrossIterationBatchNorm2d(channels, window=window)),
                                    example_inputs=example),
        "MABN": d2norm.prepare_model(nn.Sequential(conv(), MovingAverageBatchNorm2d(channels)),
                                     example_inputs=example),
        "official-style CBN": _ConvOfficialStyleCBN(conv(), OfficialStyleCrossIterationBN(channels, window=window)),
    }
    assert is_weight_centralized(blocks["MABN"][0])
    skip_mabn_warmup(blocks["MABN"])
    return {name: block.to(device).train() for name, block in blocks.items()}


def run_block_benchmark(args, channels, size, device):
    """Forward + backward of conv3x3 + norm at C = ``channels``, H = W = ``size``; the conv weight
    moves by an SGD step between steps."""
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, channels, size, size)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    grad_out = torch.randn(shape, generator=gen).to(device)
    blocks = build_blocks(channels, args.window, device)
    where = f"block C={channels}, {size}x{size}"

    def backward(y):
        y.backward(grad_out)

    def update(block):
        with torch.no_grad():
            for p in block.parameters():
                p.sub_(p.grad, alpha=1e-3)
        block.zero_grad(set_to_none=True)
        x.grad = None

    times = {name: [] for name in blocks}
    rounds = args.warmup + args.repeats
    for i in range(rounds):
        progress(f"{where}: round {i + 1}/{rounds} ({'warm-up' if i < args.warmup else 'measured'}), "
                 f"one step each of {', '.join(blocks)}")
        for name, block in blocks.items():
            seconds = timed(lambda block=block: block(x), backward, device)
            update(block)
            if i >= args.warmup:
                times[name].append(seconds)
    results = {}
    progress(f"{where}: one more step each for peak memory")
    for name, block in blocks.items():
        after_forward, peak = step_memory(lambda block=block: block(x), backward, device)
        update(block)
        results[name] = {
            "time_s": statistics.median(times[name]),
            "times_s": times[name],
            "forward_bytes": after_forward,
            "peak_bytes": peak,
            "window_state_bytes": window_state_bytes(blocks[name]),
        }
    cbn = blocks["CBN"][1]
    official = blocks["official-style CBN"].norm
    return {
        "config": {
            "batch": args.batch, "channels": channels, "size": size, "window": args.window,
            "warmup_steps": args.warmup, "measured_steps": args.repeats, "input_requires_grad": True,
        },
        "window_filled": {"CBN": int(cbn.history_length), "official-style CBN": len(official.history),
                          "max": args.window - 1},
        "results": results,
        "ratios": {
            **{f"{name}/BN": _ratios(results[name], results["BN"]) for name in results if name != "BN"},
            f"CBN/{FLOOR}": _ratios(results["CBN"], results[FLOOR]),
            "CBN/official-style CBN": _ratios(results["CBN"], results["official-style CBN"], state=True),
        },
    }


def _ratios(a, b, state=False):
    """``a / b``; for time the median of per-round ratios (a round times every variant once in turn,
    so a change in machine load between rounds cancels)."""
    ratios = {
        "time": statistics.median(ta / tb for ta, tb in zip(a["times_s"], b["times_s"])),
        "peak_memory": a["peak_bytes"] / b["peak_bytes"],
        "forward_memory": a["forward_bytes"] / b["forward_bytes"],
    }
    if state:
        ratios["window_state"] = a["window_state_bytes"] / b["window_state_bytes"]
    return ratios


# ----------------------------------------------------------------------------- detector benchmark
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
    skip_mabn_warmup(model)
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
        cbn = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        mabn = [m for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d)]
        results[norm] = {
            "time_s": statistics.median(times[norm]),
            "times_s": times[norm],
            "forward_bytes": memory[norm][0],
            "peak_bytes": memory[norm][1],
            "window_state_bytes": window_state_bytes(model),
            "norm_layers": sum(type(m) is NORM_TYPES.get(norm, nn.BatchNorm2d) for m in model.modules()),
            "foreground_rois_per_image": foreground[norm],
            "cbn_layers_pooling": sum(int(m.history_length) > 0 for m in cbn),
            "mabn_layers_past_warmup": sum(
                int(m.iters) > max(m.warmup_iters, m.renorm_free_iters, m.buffer_size) for m in mabn
            ),
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
            **{name + "/BN": _ratios(results[name], results["BN"]) for name in norms if name != "BN"},
            f"CBN/{FLOOR}": _ratios(results["CBN"], results[FLOOR]),
        },
    }


# ---------------------------------------------------------------------------------------- report
def environment(device):
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def _results_table(results, time_unit, time_scale, extra=None):
    """Absolute numbers and ratios to the ``BN`` row; ``extra(name, result)`` adds a last column."""
    header = [
        "norm", f"time ({time_unit})", "time / BN", "peak memory (MiB)", "peak / BN",
        "held after forward (MiB)", "held / BN", "window state (MiB)",
    ]
    if extra:
        header.append(extra[0])
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    bn = results["BN"]
    for name, r in results.items():
        to_bn = _ratios(r, bn)
        cells = [
            name, f"{r['time_s'] * time_scale:.{1 if time_scale > 1 else 2}f}", f"{to_bn['time']:.2f}",
            f"{r['peak_bytes'] / MIB:.2f}", f"{to_bn['peak_memory']:.2f}",
            f"{r['forward_bytes'] / MIB:.2f}", f"{to_bn['forward_memory']:.2f}",
            f"{r['window_state_bytes'] / MIB:.2f}",
        ]
        if extra:
            cells.append(extra[1](name, r))
        lines.append(_row(cells))
    return lines


def _block_section(block):
    c, filled = block["config"], block["window_filled"]
    lines = [
        f"## conv3x3 {c['channels']}->{c['channels']} + norm, N={c['batch']}, {c['size']}x{c['size']}: "
        "forward + backward",
        "",
        f"Median of {c['measured_steps']} steps after {c['warmup_steps']} warm-up steps; CBN window k={c['window']} "
        f"(stored iterations: ours {filled['CBN']}, official-style {filled['official-style CBN']}, "
        f"of {filled['max']}); "
        f"MABN past warm-up, centralised conv; {FLOOR}: BN plus one more conv weight-gradient.",
        "",
        *_results_table(block["results"], "ms", 1e3),
        "",
        _row(["ratio", "time", "peak memory", "held after forward", "window state"]),
        _row(["---"] + ["---:"] * 4),
    ]
    for name, r in block["ratios"].items():
        state = f"{r['window_state']:.2f}" if "window_state" in r else ""
        lines.append(_row([name, f"{r['time']:.2f}", f"{r['peak_memory']:.2f}", f"{r['forward_memory']:.2f}", state]))
    return lines + [""]


def markdown(report):
    env = report["environment"]
    lines = [
        "# d2norm norm benchmark", "",
        f"torch {env['torch']} on {env.get('gpu', env['device'])}; {env['torch_threads']} threads, "
        f"{env['cpu_count']} CPUs; load average (1 min) {env['load_average_1_5_15'][0]:.2f} before, "
        f"{report['load_average_after'][0]:.2f} after.",
        f"Memory: bytes above the allocation at the start of a step; {report['memory_method']}.", "",
    ]
    for block in report["blocks"]:
        lines += _block_section(block)
    detector = report.get("detector")
    if detector:
        c = detector["config"]
        active = {"CBN": "cbn_layers_pooling", "MABN": "mabn_layers_past_warmup"}

        def layers(name, r):
            return f"{r['norm_layers']}" + (f" ({r[active[name]]} active)" if name in active else "")

        foreground = ", ".join(f"{name} {r['foreground_rois_per_image']:g}" for name, r in detector["results"].items())

        lines += [
            "",
            f"## Mask R-CNN training step ({Path(c['config_file']).name}), {c['images']} images of "
            f"{c['image_size']}x{c['image_size']}, norm in FPN + box head + mask head",
            "",
            f"Forward + backward + SGD step; median of {c['measured_steps']} steps after {c['warmup_steps']} warm-up "
            f"steps; {c['rois_per_image']} RoIs per image sampled from proposals shared by all variants "
            f"(foreground RoIs per image: {foreground}); "
            f"CBN window k={c['cbn_window']}, burn-in 0 (active: pooling a non-empty history); "
            f"MABN active: past warm-up.",
            "",
            *_results_table(detector["results"], "s", 1.0, extra=("norm layers", layers)),
            "",
            _row(["ratio", "time", "peak memory"]),
            _row(["---", "---:", "---:"]),
            *(_row([name, f"{r['time']:.2f}", f"{r['peak_memory']:.2f}"]) for name, r in detector["ratios"].items()),
        ]
    return "\n".join(lines)


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
