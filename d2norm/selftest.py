"""Self-check of the d2norm layers on one device: ``python -m d2norm.selftest --device cuda``.

Run it first on a new GPU machine (``make gpu-check``). For every layer (BN as the reference,
PreciseBN, CBN, MABN, BRN, SyncCBN and SyncMABN in a one-process group) a conv + norm block trains
past burn-in / warm-up, and the checks compare it with what it must equal:

- ``float32``: the device in float32 (TF32 off) against the CPU in float64 (outputs, input and parameter
  gradients, layer state);
- ``autocast``: under ``torch.autocast`` (float16 and bfloat16 on CUDA, bfloat16 on the CPU) the
  outputs are finite and close to float32, the statistics stay float32;
- ``channels_last``: the same training in ``torch.channels_last`` memory format;
- ``compile``: ``torch.compile`` (inductor on CUDA; on the CPU the ``aot_eager_decomp_partition``
  backend, which partitions forward and backward as inductor does without compiling C++) against
  eager;
- ``no_host_sync``: the training steps under ``torch.cuda.set_sync_debug_mode("error")`` on CUDA,
  on the ``meta`` device on the CPU (any read of a value raises on either);
- ``ddp``: one DistributedDataParallel step in a one-process group (NCCL on CUDA, gloo on the CPU).

From a checkout, two more stages run the repository's tools on the device:

- ``--benchmark``: the norm-cost benchmark (``tools/benchmark_norm.py``): the CBN/BN and MABN/BN
  time and memory ratios of the conv + norm blocks and of a Mask R-CNN step;
- ``--demo``: the demo training (``tools/train_net.py`` on ``configs/demo/mask_rcnn_R_18_FPN_MABN_shapes.yaml``,
  its full 2000 iterations unless ``--demo-opts`` shortens it) and its COCO AP (43.6 box AP on the
  CPU it was measured on).

It prints a table (check, layer, result, largest deviation or the measured value) and exits 0 when
everything passed, 1 on any failure, and 3 when ``--device cuda`` is asked for without CUDA.
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .layers import (
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    PreciseBatchNorm2d,
    SyncCrossIterationBatchNorm2d,
    SyncMovingAverageBatchNorm2d,
)

__all__ = ["main", "run_checks", "run_demo", "run_benchmark"]

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "mask_rcnn_R_18_FPN_MABN_shapes.yaml"

NO_CUDA_EXIT = 3
STEPS = 6
LAYERS = {
    "BN": lambda c: nn.BatchNorm2d(c),
    "PreciseBN": lambda c: PreciseBatchNorm2d(c),
    "CBN": lambda c: CrossIterationBatchNorm2d(c, window=3, burnin_iters=2),
    "MABN": lambda c: MovingAverageBatchNorm2d(c, buffer_size=2, warmup_iters=2, renorm_free_iters=3, rmax=1.5),
    "BRN": lambda c: BatchRenorm2d(c, rmax=1.5, dmax=0.5, warmup_iters=1, rmax_iters=3, dmax_iters=3),
    "SyncCBN": lambda c: SyncCrossIterationBatchNorm2d(c, window=3, burnin_iters=2),
    "SyncMABN": lambda c: SyncMovingAverageBatchNorm2d(c, buffer_size=2, warmup_iters=2, renorm_free_iters=3,
                                                       rmax=1.5),
}


def _block(name, device, dtype=torch.float32, memory_format=torch.contiguous_format):
    from .modeling.binding import prepare_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), LAYERS[name](8))
    prepare_model(model, example_inputs=(torch.zeros(1, 3, 8, 8),))
    return model.to(device=device, dtype=dtype, memory_format=memory_format).train()


def _batches(device, dtype, memory_format=torch.contiguous_format):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64) * (1 + t % 3) + 0.5)
            .to(device=device, dtype=dtype).contiguous(memory_format=memory_format) for t in range(STEPS)]


def _train(model, batches, autocast_dtype=None, step=None):
    """SGD steps; per step the output, the input gradient and the parameter gradients (float64, CPU)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run = step or model
    record = []
    generator = torch.Generator().manual_seed(2)
    for x in batches:
        x = x.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            y = run(x)
        # A fixed random projection: gradients without the cancellations of a norm-invariant loss.
        projection = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, torch.float32)
        (y.float() * projection).sum().backward()
        record.append([t.detach().double().cpu() for t in (y, x.grad, *(p.grad for p in model.parameters()))])
        optimizer.step()
        optimizer.zero_grad()
    return record


def _deviation(got, want):
    """Largest |got - want| / (|want|_max + 1e-6) over paired tensors."""
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float((a - b).abs().max() / (b.abs().max() + 1e-6)) if a.numel() else 0.0)
    return worst


def _flat(record, model):
    tensors = [t for step in record for t in step]
    return tensors + [t.detach().double().cpu() for t in model.state_dict().values() if t.is_floating_point()]


def check_float32(name, device):
    model, reference = _block(name, device), _block(name, "cpu", torch.float64)
    got = _flat(_train(model, _batches(device, torch.float32)), model)
    want = _flat(_train(reference, _batches("cpu", torch.float64)), reference)
    return _deviation(got, want), 1e-4


def check_autocast(name, device, dtype):
    model, reference = _block(name, device), _block(name, device)
    got = _train(model, _batches(device, torch.float32), autocast_dtype=dtype)
    want = _train(reference, _batches(device, torch.float32))
    if not all(torch.isfinite(t).all() for step in got for t in step):
        return float("inf"), 0.0
    statistics_float32 = all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    return (_deviation([s[0] for s in got], [s[0] for s in want]) if statistics_float32 else float("inf")), 0.1


def check_channels_last(name, device):
    model = _block(name, device, memory_format=torch.channels_last)
    reference = _block(name, device)
    got = _flat(_train(model, _batches(device, torch.float32, torch.channels_last)), model)
    want = _flat(_train(reference, _batches(device, torch.float32)), reference)
    return _deviation(got, want), 1e-4


def check_compile(name, device):
    backend = "inductor" if device.type == "cuda" else "aot_eager_decomp_partition"
    model, reference = _block(name, device), _block(name, device)
    got = _flat(_train(model, _batches(device, torch.float32), step=torch.compile(model, backend=backend)), model)
    want = _flat(_train(reference, _batches(device, torch.float32)), reference)
    return _deviation(got, want), 1e-4


def check_no_host_sync(name, device):
    if device.type == "cuda":
        model = _block(name, device)
        batches = _batches(device, torch.float32)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in batches:
                model(x.requires_grad_()).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        model = _block(name, "meta")
        for _ in range(STEPS):
            model(torch.empty(2, 3, 8, 8, device="meta", requires_grad=True)).sum().backward()
    return 0.0, 0.0


def check_ddp(name, device):
    from torch.nn.parallel import DistributedDataParallel

    model, reference = _block(name, device), _block(name, device)
    ddp = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                  broadcast_buffers=False)
    got = _flat(_train(model, _batches(device, torch.float32), step=ddp), model)
    want = _flat(_train(reference, _batches(device, torch.float32)), reference)
    return _deviation(got, want), 1e-5


@contextlib.contextmanager
def _one_process_group(device):
    """A one-process group (NCCL on CUDA, gloo otherwise) for the DDP and synchronised-layer checks."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def _without_tf32():
    """TF32 convs and matmuls (CUDA's default for convs) round to ~1e-3: off, so that the checks
    see the layers' own precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_checks(device, layers=None, report=print):
    """Run every check on ``device`` for ``layers`` (default: all); returns the rows
    ``(check, layer, passed, deviation, tolerance, note)``."""
    device = torch.device(device)
    checks = [("float32 vs CPU float64", check_float32), ("channels_last", check_channels_last),
              ("compile", check_compile), ("no host sync", check_no_host_sync)]
    for dtype in ((torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.bfloat16,)):
        checks.append((f"autocast {str(dtype).removeprefix('torch.')}",
                       lambda name, dev, dtype=dtype: check_autocast(name, dev, dtype)))
    rows = []
    with _one_process_group(device), _without_tf32():
        for check, run in [*checks, ("DDP step", check_ddp)]:
            for name in layers or LAYERS:
                try:
                    deviation, tolerance = run(name, device)
                    passed, note = deviation <= tolerance, ""
                except Exception as error:  # a failing check is a row of the table, not the end of it
                    deviation, tolerance, passed, note = float("nan"), 0.0, False, f"{type(error).__name__}: {error}"
                rows.append((check, name, passed, deviation, tolerance, note))
                report(f"{'ok  ' if passed else 'FAIL'} {check:<24} {name:<10} {deviation:.2e} (tolerance "
                       f"{tolerance:.0e}) {note}".rstrip())
    return rows


def _tool(name):
    path = REPO / "tools" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: this stage runs from a d2norm checkout")
    return path


def _run_tool(argv, report):
    """Run a repository tool; its output goes to ``report`` line by line; returns the exit code."""
    process = subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        report(f"     | {line.rstrip()}")
    process.wait()
    return process.returncode, lines


def run_benchmark(device, extra_args=(), report=print):
    """The norm-cost benchmark on ``device``: rows with the CBN/BN and MABN/BN ratios (time, peak
    memory) of every block and of the detector step; passed when it ran and every ratio is finite."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "benchmark.json"
        try:
            code, lines = _run_tool([_tool("benchmark_norm.py"), "--device", str(device), "--json", out,
                                     *extra_args], report)
        except FileNotFoundError as error:
            return [("norm-cost benchmark", "CBN, MABN", False, None, None, str(error))]
        if code != 0 or not out.is_file():
            return [("norm-cost benchmark", "CBN, MABN", False, None, None,
                     f"exit {code}: {lines[-1] if lines else 'no output'}")]
        result = json.loads(out.read_text())
    rows = []
    parts = [(f"block C={b['config']['channels']}, {b['config']['size']}²", b["ratios"]) for b in result["blocks"]]
    if result.get("detector"):
        parts.append(("Mask R-CNN step", result["detector"]["ratios"]))
    for where, ratios in parts:
        for name in ("CBN/BN", "MABN/BN"):
            if name in ratios:
                r = ratios[name]
                passed = math.isfinite(r["time"]) and math.isfinite(r["peak_memory"])
                rows.append((f"norm-cost benchmark: {where}", name, passed, r["time"], None,
                             f"time ratio {r['time']:.2f}, peak memory ratio {r['peak_memory']:.2f}"))
    return rows


def run_demo(device, extra_opts=(), report=print):
    """The demo training on ``device`` and its COCO AP: one row, passed when it trained and evaluated
    to a finite box AP."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        try:
            code, lines = _run_tool([_tool("train_net.py"), "--config-file", DEMO_CONFIG, "MODEL.DEVICE", str(device),
                                     "OUTPUT_DIR", tmp, *extra_opts], report)
        except FileNotFoundError as error:
            return [("demo training", "MABN demo", False, None, None, str(error))]
        seconds = time.time() - started
        evaluation = Path(tmp) / "evaluation.json"
        if code != 0 or not evaluation.is_file():
            return [("demo training", "MABN demo", False, None, None, f"exit {code}: {lines[-1] if lines else ''}")]
        results = json.loads(evaluation.read_text())
    tasks = results if "bbox" in results else next(iter(results.values()))
    box, mask = tasks["bbox"]["AP"], tasks.get("segm", {}).get("AP", float("nan"))
    return [("demo training", "MABN demo", math.isfinite(box), box, None,
             f"box AP {box:.1f}, mask AP {mask:.1f} in {seconds / 60:.1f} min (the CPU measurement: 43.6)")]


def _value(value, spec):
    return "—" if value is None else format(value, spec)


def markdown(rows, device):
    lines = [f"# d2norm self-check on {device}", "",
             "| check | layer | result | deviation or value | tolerance | note |", "|---|---|---|---:|---:|---|"]
    for check, name, passed, deviation, tolerance, note in rows:
        lines.append(f"| {check} | {name} | {'pass' if passed else 'FAIL'} | {_value(deviation, '.2e')} | "
                     f"{_value(tolerance, '.0e')} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--layers", nargs="*", choices=sorted(LAYERS), help="only these layers")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    parser.add_argument("--benchmark", action="store_true", help="also run the norm-cost benchmark (tools/)")
    parser.add_argument("--benchmark-args", nargs="*", default=[], help="arguments for tools/benchmark_norm.py")
    parser.add_argument("--demo", action="store_true", help="also train the demo and report its COCO AP (tools/)")
    parser.add_argument("--demo-opts", nargs="*", default=[], help="config overrides KEY VALUE for the demo")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("d2norm self-check: CUDA is not available on this machine (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}); nothing was checked. "
              "Run `python -m d2norm.selftest --device cpu` for the CPU checks.", file=sys.stderr)
        return NO_CUDA_EXIT
    rows = run_checks(device, args.layers)
    if args.benchmark:
        rows += run_benchmark(device, args.benchmark_args)
    if args.demo:
        rows += run_demo(device, args.demo_opts)
    table = markdown(rows, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    failed = [row for row in rows if not row[2]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
