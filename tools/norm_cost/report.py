"""The markdown report of ``tools/benchmark_norm.py``."""
from pathlib import Path

from .measure import MIB, ratios
from .variants import FLOOR


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
        to_bn = ratios(r, bn)
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
        def layers(name, r):
            return f"{r['norm_layers']}" + (f" ({r['layers_past_warmup']} active)" if name in ("CBN", "MABN") else "")

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
