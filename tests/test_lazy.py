"""LazyConfig users get what YAML users get: the same model, norm settings, optimizer groups and
hooks (d2norm.lazy), and every LazyConfig under configs/ loads, builds and trains on the CPU."""
import json
import math
import os
from pathlib import Path

import detectron2.data.transforms as T
import pytest
import torch
import torch.nn as nn
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, get_cfg
from omegaconf import ListConfig, OmegaConf
from tool_scripts import load_tool

import d2norm
from d2norm import lazy
from d2norm.config.defaults import D2NormConfigError
from d2norm.data import register_shapes_split
from d2norm.engine.hooks import build_norm_hooks
from d2norm.engine.solver import build_optimizer
from d2norm.layers import MovingAverageBatchNorm2d
from d2norm.layers.per_level import PerLevelNorm
from d2norm.layers.precise_bn import NotRecalibratedError
from d2norm.modeling.build import build_model
from d2norm.modeling.conv_inputs import find_norm_inputs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO = "demo/mask_rcnn_R_18_FPN_MABN_shapes"
LAZY_CONFIGS = sorted(
    p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.py")
    if p.parent.name != "common" and not p.name.startswith("base_")
)

lazyconfig_train_net = load_tool("lazyconfig_train_net")


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    register_shapes_split("lazy_shapes_train", root / "train", num_images=6, seed=5)
    register_shapes_split("lazy_shapes_val", root / "val", num_images=2, seed=6)
    return "lazy_shapes_train", "lazy_shapes_val"


def yaml_demo(*opts):
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(str(CONFIGS / f"{DEMO}.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def lazy_demo(*overrides):
    cfg = LazyConfig.load(str(CONFIGS / f"{DEMO}.py"))
    return LazyConfig.apply_overrides(cfg, ["train.device=cpu", *overrides])


def _plain(value):
    if isinstance(value, ListConfig):
        value = OmegaConf.to_object(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, nn.Module):  # a submodule also listed by attribute: compared on its own
        return type(value)
    return value


# detectron2's from_config gives {"loss_box_reg": 1.0} where LazyConfig spells out loss_cls = 1.0 as
# well (the same weights: a missing key means 1.0).
_EQUIVALENT = {("roi_heads.box_predictor", "loss_weight")}
_MODULE_INTERNALS = set(vars(nn.Module()))


def module_settings(model):
    """``{module path: (type, {attribute: value})}`` over every module's plain attributes."""
    out = {}
    for name, module in model.named_modules():
        attrs = {k: _plain(v) for k, v in vars(module).items()
                 if isinstance(v, (int, float, str, bool, tuple, list, dict, ListConfig, type(None)))
                 and k not in _MODULE_INTERNALS and (name, k) not in _EQUIVALENT}
        out[name] = (type(module), attrs)
    return out


def test_yaml_and_lazyconfig_demo_build_the_same_model():
    torch.manual_seed(0)
    yaml_model = build_model(yaml_demo())
    torch.manual_seed(0)
    lazy_model = lazy.build_model(lazy_demo())

    assert module_settings(lazy_model) == module_settings(yaml_model)
    assert [(n, p.shape) for n, p in lazy_model.named_parameters()] == \
        [(n, p.shape) for n, p in yaml_model.named_parameters()]
    mabns = [m for m in lazy_model.modules() if isinstance(m, MovingAverageBatchNorm2d)]
    assert len(mabns) == 12
    assert all((m.buffer_size, m.warmup_iters, m.renorm_free_iters) == (16, 100, 1000) for m in mabns)
    pairs = [[(i.name, i.conv_name) for i in find_norm_inputs(m)] for m in (yaml_model, lazy_model)]
    assert pairs[0] == pairs[1] and len(pairs[0]) == 12


def _groups_by_name(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"])
            for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("yaml_opts, lazy_overrides", [
    ([], []),
    (["SOLVER.WEIGHT_DECAY_NORM", "0.0005", "SOLVER.BIAS_LR_FACTOR", "2.0", "SOLVER.WEIGHT_DECAY_BIAS", "0.0"],
     ["optimizer.params.weight_decay_norm=0.0005", "optimizer.params.bias_lr_factor=2.0",
      "optimizer.params.weight_decay_bias=0.0"]),
])
def test_yaml_and_lazyconfig_demo_give_the_same_optimizer_groups(yaml_opts, lazy_overrides):
    """Every d2norm layer counts as a norm (WEIGHT_DECAY_NORM), in both paths."""
    cfg, lazy_cfg = yaml_demo(*yaml_opts), lazy_demo(*lazy_overrides)
    yaml_model, lazy_model = build_model(cfg), lazy.build_model(lazy_cfg)
    yaml_groups = _groups_by_name(yaml_model, build_optimizer(cfg, yaml_model))
    lazy_groups = _groups_by_name(lazy_model, lazy.build_optimizer(lazy_cfg, lazy_model))
    assert lazy_groups == yaml_groups
    mabn_weight = next(n for n, m in lazy_model.named_modules() if isinstance(m, MovingAverageBatchNorm2d))
    assert lazy_groups[f"{mabn_weight}.weight"][1] == cfg.SOLVER.WEIGHT_DECAY_NORM


def test_yaml_and_lazyconfig_demo_get_the_same_norm_hooks(tiny_splits):
    train, _ = tiny_splits
    cfg = yaml_demo("DATASETS.TRAIN", f"('{train}',)", "D2NORM.FREEZE_NORM_LAST_ITERS", "10",
                    "TEST.EVAL_PERIOD", "100")
    lazy_cfg = lazy_demo(f"dataloader.train.dataset.names={train}", "d2norm.FREEZE_NORM_LAST_ITERS=10",
                         "train.eval_period=100")
    trainer = load_tool("train_net").Trainer

    def describe(hooks):
        return [(type(h).__name__, getattr(h, "_periods", None), getattr(h, "num_iters", None),
                 getattr(getattr(h, "recalibrator", None), "num_iter", None)) for h in hooks]

    yaml_hooks = build_norm_hooks(cfg, build_model(cfg), trainer.build_train_loader)
    lazy_hooks = lazy.build_norm_hooks(lazy_cfg, lazy.build_model(lazy_cfg))
    assert describe(lazy_hooks) == describe(yaml_hooks) == [  # the demo monitors its norm statistics
        ("NormStatsMonitor", None, None, None), ("RecalibrateNorms", [100], None, 50),
        ("FreezeNormLastIters", None, 10, 50)]


TWINS = [  # LazyConfig twins of YAML configs: the same experiment
    DEMO,
    "demo/mask_rcnn_R_18_FPN_CBN_shapes",
    "CBN/mask_rcnn_R_50_FPN_1x_cbn",
    "MABN/mask_rcnn_R_50_FPN_2x_scratch_mabn",
    "MABN/retinanet_R_50_FPN_2x_scratch_mabn",
    "RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_ema",
    "RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_precise",
    "RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_shuffle",
    "RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead",
]


def _lr_multipliers(schedule, max_iter, iters):
    return [pytest.approx(schedule(i / max_iter)) for i in iters]


@pytest.mark.parametrize("name", TWINS)
def test_lazyconfig_twin_is_the_yaml_experiment(name):
    """Model, D2NORM, optimizer groups, LR schedule, data and schedule length agree."""
    from detectron2.config import instantiate
    from detectron2.solver import build_lr_scheduler

    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(str(CONFIGS / f"{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    lazy_cfg = LazyConfig.load(str(CONFIGS / f"{name}.py"))
    lazy_cfg.train.device = "cpu"
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    torch.manual_seed(0)
    lazy_model = lazy.build_model(lazy_cfg)
    assert module_settings(lazy_model) == module_settings(yaml_model)
    assert lazy.d2norm_node(lazy_cfg).D2NORM == cfg.D2NORM

    yaml_optimizer, lazy_optimizer = build_optimizer(cfg, yaml_model), lazy.build_optimizer(lazy_cfg, lazy_model)
    assert _groups_by_name(lazy_model, lazy_optimizer) == _groups_by_name(yaml_model, yaml_optimizer)
    assert type(lazy_optimizer).__name__ == type(yaml_optimizer).__name__  # detectron2's per-parameter clipping
    # whole-model clipping (a step pre-hook) or not
    assert len(lazy_optimizer._optimizer_step_pre_hooks) == len(yaml_optimizer._optimizer_step_pre_hooks)

    solver, train = cfg.SOLVER, lazy_cfg.train
    assert (train.max_iter, train.reference_world_size, train.init_checkpoint) == (
        solver.MAX_ITER, solver.REFERENCE_WORLD_SIZE, cfg.MODEL.WEIGHTS)
    iters = sorted({0, solver.WARMUP_ITERS // 2, solver.WARMUP_ITERS, *solver.STEPS,
                    *(s - 1 for s in solver.STEPS), solver.MAX_ITER - 1})
    yaml_schedule = build_lr_scheduler(cfg, yaml_optimizer)._multiplier
    assert _lr_multipliers(instantiate(lazy_cfg.lr_multiplier), solver.MAX_ITER, iters) == \
        [yaml_schedule(i / solver.MAX_ITER) for i in iters]
    loader = lazy_cfg.dataloader.train
    resize = loader.mapper.augmentations[0]
    assert loader.total_batch_size == solver.IMS_PER_BATCH
    assert (tuple(resize.short_edge_length), resize.max_size) == (
        tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN)
    assert loader.dataset.names in (cfg.DATASETS.TRAIN[0], list(cfg.DATASETS.TRAIN))


def test_retinanet_head_norms_get_per_level_statistics_and_head_warmup():
    cfg = LazyConfig.load(str(CONFIGS / "MABN/retinanet_R_50_FPN_2x_scratch_mabn.py"))
    cfg.train.device = "cpu"
    model = lazy.build_model(cfg)
    per_level = [m for m in model.head.modules() if isinstance(m, PerLevelNorm)]
    assert len(per_level) == 8 and all(m.num_levels == 5 for m in per_level)
    head_layers = {id(m) for p in per_level for m in p.per_level_layers()}
    for m in model.modules():
        if isinstance(m, MovingAverageBatchNorm2d):
            assert m.warmup_iters == (10_000 if id(m) in head_layers else 100)


def test_fcos_head_norms_get_per_level_statistics():
    """FCOS's head subclasses RetinaNet's: its d2norm layers also get one set of statistics per level."""
    from detectron2.model_zoo import get_config

    cfg = OmegaConf.create({"model": get_config("common/models/fcos.py").model, "train": {"device": "cpu"}})
    cfg.model.head.norm = "CBN"
    cfg.model.backbone.bottom_up.freeze_at = 2
    model = lazy.build_model(cfg)
    per_level = [m for m in model.head.modules() if isinstance(m, PerLevelNorm)]
    assert len(per_level) == 8 and all(m.num_levels == 5 for m in per_level)
    assert all(layer._bound_conv() is not None for p in per_level for layer in p.per_level_layers())


def test_a_bad_d2norm_value_names_the_lazyconfig_key():
    with pytest.raises(D2NormConfigError, match=r"cfg\.d2norm\.CBN\.WINDOW = 0 is invalid"):
        lazy.d2norm_node(lazy_demo("d2norm.CBN.WINDOW=0"))
    with pytest.raises(D2NormConfigError, match="CBN.WINDOWS"):
        lazy.d2norm_node(OmegaConf.create({"d2norm": {"CBN": {"WINDOWS": 4}}}))


def test_reference_world_size_keeps_two_images_per_gpu():
    cfg = LazyConfig.load(str(CONFIGS / "CBN/mask_rcnn_R_50_FPN_1x_cbn.py"))
    lazy.scale_to_world_size(cfg, 4)
    assert cfg.dataloader.train.total_batch_size == 8
    assert cfg.optimizer.optimizer.lr == pytest.approx(0.01)
    assert cfg.train.max_iter == 2 * 87949
    assert cfg.d2norm.CBN.BURNIN_ITERS == 2 * 21987 and cfg.d2norm.CBN.WINDOW == 8
    optimizer = lazy.build_optimizer(cfg, nn.Conv2d(1, 1, 1))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def shrink(cfg, splits, output_dir):
    """Keep each config's norms and recipe; make a 2-iteration CPU run on tiny data quick."""
    train, _ = splits
    cfg.train.update(device="cpu", max_iter=2, eval_period=0, init_checkpoint="", output_dir=str(output_dir),
                     reference_world_size=0)
    cfg.dataloader.train.update(total_batch_size=2, num_workers=0)
    cfg.dataloader.train.dataset.names = train
    cfg.dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(64,), max_size=64, sample_style="choice")]
    cfg.dataloader.pop("evaluator")  # no COCO here; evaluation is tested elsewhere
    model = cfg.model
    if "roi_heads" in model:
        model.roi_heads.update(num_classes=5, batch_size_per_image=16)
        model.proposal_generator.update(batch_size_per_image=32, pre_nms_topk=(200, 100), post_nms_topk=(50, 50))
    else:
        model.num_classes = 5
    # Reach every stage of the d2norm layers within 2 iterations.
    cfg.d2norm.CBN.BURNIN_ITERS = 1
    cfg.d2norm.MABN.update(BUFFER_SIZE=1, WARMUP_ITERS=0, RENORM_FREE_ITERS=0, HEAD_WARMUP_ITERS=0)
    cfg.d2norm.PRECISE_BN.NUM_ITER = 2
    return cfg


@pytest.mark.parametrize("path", LAZY_CONFIGS)
def test_every_lazyconfig_loads_builds_and_trains_two_iterations(path, tiny_splits, tmp_path):
    torch.manual_seed(0)  # a fixed initialisation: the check is that each config trains, not luck
    cfg = shrink(LazyConfig.load(str(CONFIGS / path)), tiny_splits, tmp_path)
    args = lazyconfig_train_net.default_argument_parser().parse_args(["--config-file", str(CONFIGS / path)])
    lazyconfig_train_net.do_train(args, cfg)
    assert os.path.isfile(tmp_path / "model_final.pth")
    losses = [json.loads(line).get("total_loss") for line in (tmp_path / "metrics.json").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_lazyconfig_train_net_trains_resumes_and_evaluates_coco_ap(tiny_splits, tmp_path):
    """The tool as a user runs it: PreciseBN heads recalibrated before the final COCO evaluation."""
    train, val = tiny_splits
    opts = [f"train.output_dir={tmp_path}", "train.max_iter=2", "train.eval_period=0",
            "train.checkpointer.period=1", f"dataloader.train.dataset.names={train}",
            f"dataloader.test.dataset.names={val}", "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0", "d2norm.PRECISE_BN.NUM_ITER=2",
            "model.roi_heads.box_head.conv_norm=PreciseBN", "model.roi_heads.mask_head.conv_norm=PreciseBN"]
    argv = ["--config-file", str(CONFIGS / f"{DEMO}.py"), *opts]
    results = lazyconfig_train_net.main(lazyconfig_train_net.default_argument_parser().parse_args(argv))
    assert "bbox" in results and "AP" in results["bbox"]
    resumed = lazyconfig_train_net.main(
        lazyconfig_train_net.default_argument_parser().parse_args([*argv[:2], "--resume", *opts[1:], "train.max_iter=3",
                                                                   f"train.output_dir={tmp_path}"]))
    assert "bbox" in resumed
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert state["iteration"] == 2  # resumed at iteration 2 (of 3), saved its last iteration's state
    precise = [k for k in state["model"] if k.endswith("recalibrated")]
    assert precise and all(bool(state["model"][k]) for k in precise)

    # --eval-only of a checkpoint whose PreciseBN layers lost their statistics: evaluating needs a
    # recalibration first, which D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY runs.
    for k in precise:
        state["model"][k] = torch.zeros((), dtype=torch.bool)
    torch.save(state, tmp_path / "uncalibrated.pth")
    eval_argv = [*argv[:2], "--eval-only", *opts, f"train.init_checkpoint={tmp_path / 'uncalibrated.pth'}"]
    with pytest.raises(NotRecalibratedError):
        lazyconfig_train_net.main(lazyconfig_train_net.default_argument_parser().parse_args(eval_argv))
    evaluated = lazyconfig_train_net.main(lazyconfig_train_net.default_argument_parser().parse_args(
        [*eval_argv, "d2norm.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY=True"]))
    assert "bbox" in evaluated
