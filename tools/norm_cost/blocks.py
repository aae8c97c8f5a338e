"""Block benchmark: conv3x3 + norm, forward + backward, every variant in turn per round."""
import statistics

import torch
import torch.nn as nn

import d2norm
from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.layers.weight_centralization import is_weight_centralized

from .measure import progress, ratios, step_memory, timed
from .official_cbn import ConvOfficialStyleCBN, OfficialStyleCrossIterationBN
from .variants import FLOOR, add_cbn_floor, skip_warmup, window_state_bytes


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
        "official-style CBN": ConvOfficialStyleCBN(conv(), OfficialStyleCrossIterationBN(channels, window=window)),
    }
    assert is_weight_centralized(blocks["MABN"][0])
    skip_warmup(blocks["MABN"])
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
            **{f"{name}/BN": ratios(results[name], results["BN"]) for name in results if name != "BN"},
            f"CBN/{FLOOR}": ratios(results["CBN"], results[FLOOR]),
            "CBN/official-style CBN": ratios(results["CBN"], results["official-style CBN"], state=True),
        },
    }
