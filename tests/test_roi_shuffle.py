"""RoI shuffle across workers (Rethinking-BN Sec. 6) on gloo: the head's outputs equal the unshuffled
computation (the shuffle is undone), gradients reach every worker's RoIs, and a worker's norm
batch mixes RoIs of other workers; uneven RoI counts per worker. float64."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from test_cluster_launch import _run
from test_train_net import DEMO_BASE, tiny_opts, tiny_splits, train_script  # noqa: F401  (fixture)

from d2norm.engine.launch import free_port
from d2norm.modeling.roi_shuffle import RoIShuffle, shuffle_rois_across_workers

COUNTS = (5, 3)  # RoIs per worker


def _head(norm):
    torch.manual_seed(0)
    return FastRCNNConvFCHead(ShapeSpec(channels=4, height=5, width=5), conv_dims=[6, 6], fc_dims=[7],
                              conv_norm=norm).double()


def _rois():
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 4, 5, 5, generator=generator, dtype=torch.float64) + r for r, n in enumerate(COUNTS)]
    gs = [torch.randn(n, 7, generator=generator, dtype=torch.float64) for n in COUNTS]
    return xs, gs


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(COUNTS))
    torch.manual_seed(100 + rank)  # only rank 0's permutation counts
    xs, gs = _rois()
    out = {}
    for norm in ("", "BN"):
        head = _head(norm)
        shuffle = RoIShuffle(next(head.children()), list(head.children())[-1])
        seen = []
        head.conv1.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].detach().clone()))
        x = xs[rank].clone().requires_grad_()
        y = head(x)
        y.backward(gs[rank])
        out[norm] = (y.detach(), x.grad, seen[0], [p.grad.clone() for p in head.parameters()])
        shuffle.remove()
    results[rank] = out
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def shuffled():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=len(COUNTS), join=True)
    return dict(results)


def test_outputs_and_input_gradients_are_the_unshuffled_ones(shuffled):
    """A head without a batch-dependent norm computes each RoI alone: shuffling and restoring the
    order changes nothing, including the gradient reaching each worker's RoIs."""
    xs, gs = _rois()
    for rank in range(len(COUNTS)):
        head = _head("")
        x = xs[rank].clone().requires_grad_()
        y = head(x)
        y.backward(gs[rank])
        output, grad, _, _ = shuffled[rank][""]
        torch.testing.assert_close(output, y.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)


def test_a_workers_norm_batch_mixes_rois_of_every_worker_and_every_roi_gets_a_gradient(shuffled):
    xs, _ = _rois()
    everything = torch.cat(xs)
    origin = torch.cat([torch.full((n,), r) for r, n in enumerate(COUNTS)])
    conv_inputs = []
    for rank in range(len(COUNTS)):
        _, grad, seen, param_grads = shuffled[rank]["BN"]
        assert seen.shape[0] == COUNTS[rank]  # each worker keeps its number of RoIs ...
        rows = [int((everything - row).abs().flatten(1).amax(1).argmin()) for row in seen]
        assert all(torch.equal(everything[i], row) for i, row in zip(rows, seen))
        assert len(set(origin[rows].tolist())) > 1  # ... but normalises RoIs of both workers
        conv_inputs += rows
        assert grad.shape == xs[rank].shape and (grad.flatten(1).abs().amax(1) > 0).all()
        assert all(g.abs().sum() > 0 for g in param_grads)
    assert sorted(conv_inputs) == list(range(sum(COUNTS)))  # a permutation: every RoI exactly once


def test_an_eval_or_single_worker_forward_is_not_shuffled():
    head = _head("BN")
    RoIShuffle(next(head.children()), list(head.children())[-1])
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(head(x), _head("BN")(x))


def test_shuffling_a_model_without_rcnn_heads_names_the_key():
    with pytest.raises(ValueError, match="D2NORM.SHUFFLE_ROIS: the Sequential has no R-CNN box or mask head"):
        shuffle_rois_across_workers(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_the_config_switch_shuffles_the_box_and_mask_heads_of_the_built_model():
    from pathlib import Path

    from d2norm.config import load_config
    from d2norm.modeling.build import build_model

    config = Path(__file__).resolve().parents[1] / "configs/RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_shuffle.yaml"
    cfg = load_config(config, ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
                               "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    assert cfg.D2NORM.SHUFFLE_ROIS
    heads = build_model(cfg).roi_heads
    for head in (heads.box_head, heads.mask_head):
        first, *_, last = head.children()
        assert any(isinstance(getattr(h, "__self__", None), RoIShuffle) for h in first._forward_pre_hooks.values())
        assert any(isinstance(getattr(h, "__self__", None), RoIShuffle) for h in last._forward_hooks.values())


def test_train_net_on_2_gloo_workers_trains_with_shuffled_bn_heads(tiny_splits, tmp_path):  # noqa: F811
    """The user's path: ``tools/train_net.py --num-gpus 2 D2NORM.SHUFFLE_ROIS True`` under DDP (the
    gathers' backward all-reduces run beside DDP's gradient buckets)."""
    import sys

    script = train_script(tmp_path)
    opts = tiny_opts("BN", tmp_path / "out", tiny_splits, max_iter=2) + [
        "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "D2NORM.SHUFFLE_ROIS", "True",
        "D2NORM.PRECISE_BN.ENABLED", "False"]
    proc = _run([sys.executable, str(script), "--config-file", str(DEMO_BASE), "--num-gpus", "2",
                 "--dist-url", "auto", *opts], {"DATA_ROOT": str(tmp_path / "data")}, tmp_path)
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-6000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "RoIs are shuffled across workers in training through roi_heads.box_head, roi_heads.mask_head" in log
