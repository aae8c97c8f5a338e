"""The paper configs under ``configs/`` say what the papers did, build, and train.

Specification: the official configs of Howal/Cross-iterationBatchNorm (CBN) and megvii-model/MABN
(MABN), the MABN paper's App. B.3 (batch statistics in the heads for the first 10,000 iterations),
detectron2's configs and projects/Rethinking-BatchNorm ("Rethinking 'Batch' in BatchNorm"). Every config
trains 2 images per GPU on 8 GPUs.
"""
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from tool_scripts import load_tool

from d2norm.layers import BatchRenorm2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.layers.weight_centralization import is_weight_centralized
from d2norm.modeling.binding import conv_norm_pairs
from d2norm.modeling.build import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# COCO train2017 after detectron2's empty-annotation filter (118,287 - 1,021 images), 16 per iteration.
COCO_TRAIN_IMAGES = 117_266
IMAGES_PER_ITER = 16


def epochs(n):
    """Iterations in ``n`` COCO epochs: floor(n * images / batch), the official CBN conversion."""
    return n * COCO_TRAIN_IMAGES // IMAGES_PER_ITER


MSRA_R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

# Solver/input recipe of each paper family.
RECIPES = {
    # CBN official configs (mmdetection): 1x = 12 epochs, steps at epochs 8 and 11, SGD 0.02 with
    # weight decay on every parameter, warm-up 500 from 1/3, grad-clip L2 35, single scale 800.
    "cbn": dict(BASE_LR=0.02, MAX_ITER=epochs(12), STEPS=(epochs(8), epochs(11)), WARMUP_ITERS=500,
                WARMUP_FACTOR=1 / 3, CLIP=35.0, WEIGHT_DECAY_NORM=1e-4, BIAS_LR_FACTOR=1.0,
                WEIGHT_DECAY_BIAS=1e-4, MIN_SIZE_TRAIN=(800,), PRECISE_BN=False),
    # MABN official det configs (maskrcnn-benchmark): 2x = 180k at 16 images, steps 120k/160k,
    # wd 1e-4 on all weights incl. norm gamma, biases 2x LR and no wd, warm-up 500 from 1/3.
    "mabn": dict(BASE_LR=0.02, MAX_ITER=180_000, STEPS=(120_000, 160_000), WARMUP_ITERS=500,
                 WARMUP_FACTOR=1 / 3, CLIP=None, WEIGHT_DECAY_NORM=1e-4, BIAS_LR_FACTOR=2.0,
                 WEIGHT_DECAY_BIAS=0.0, MIN_SIZE_TRAIN=(800,), PRECISE_BN=False),
    "mabn_retinanet": dict(BASE_LR=0.01, MAX_ITER=180_000, STEPS=(120_000, 160_000), WARMUP_ITERS=500,
                           WARMUP_FACTOR=1 / 3, CLIP=None, WEIGHT_DECAY_NORM=1e-4, BIAS_LR_FACTOR=2.0,
                           WEIGHT_DECAY_BIAS=0.0, MIN_SIZE_TRAIN=(800,), PRECISE_BN=False),
    # detectron2 projects/Rethinking-BatchNorm (LazyConfig common recipe): 3x, warm-up 1000 from 1e-3.
    "rethinking": dict(BASE_LR=0.02, MAX_ITER=270_000, STEPS=(210_000, 250_000), WARMUP_ITERS=1000,
                       WARMUP_FACTOR=0.001, CLIP=None, WEIGHT_DECAY_NORM=0.0, BIAS_LR_FACTOR=1.0,
                       WEIGHT_DECAY_BIAS=1e-4, MIN_SIZE_TRAIN=(640, 672, 704, 736, 768, 800),
                       PRECISE_BN=None),
    "rethinking_retinanet": dict(BASE_LR=0.01, MAX_ITER=270_000, STEPS=(210_000, 250_000), WARMUP_ITERS=1000,
                                 WARMUP_FACTOR=0.001, CLIP=None, WEIGHT_DECAY_NORM=0.0, BIAS_LR_FACTOR=1.0,
                                 WEIGHT_DECAY_BIAS=1e-4,
                                 MIN_SIZE_TRAIN=(640, 672, 704, 736, 768, 800), PRECISE_BN=True),
}


def _config(path, recipe, arch, weights, freeze_at, norms, cbn=None, precise_bn=None, shared_head_norms=False):
    """One row: ``norms`` maps backbone/fpn/box_head/mask_head/head to a norm name or None;
    ``shared_head_norms``: one RetinaNet head norm for all FPN levels (else one per level)."""
    return pytest.param(
        dict(path=path, recipe=recipe, arch=arch, weights=weights, freeze_at=freeze_at, norms=norms,
             cbn=cbn, precise_bn=precise_bn, shared_head_norms=shared_head_norms),
        id=path,
    )


def _rcnn_norms(backbone, fpn, heads, mask=True):
    return dict(backbone=backbone, fpn=fpn, box_head=heads, mask_head=heads if mask else None, head=None)


def _retinanet_norms(backbone, fpn, head):
    return dict(backbone=backbone, fpn=fpn, box_head=None, mask_head=None, head=head)


CBN_PAPER = dict(window=8, burnin_iters=epochs(3))  # k = 8, burn-in 3 epochs (paper)
CBN_OFFICIAL = dict(window=4, burnin_iters=epochs(8))  # buffer_num=3, burnin=8 of 12 epochs (repo)

PAPER_CONFIGS = [
    *[
        _config(f"CBN/{arch}_R_50_FPN_1x_{variant}.yaml", "cbn", "rcnn", MSRA_R50, 2,
                _rcnn_norms("FrozenBN", norm, norm, mask=arch == "mask_rcnn"), cbn=cbn)
        for arch in ("faster_rcnn", "mask_rcnn")
        for variant, norm, cbn in (
            ("nonorm", None, None),
            ("syncbn", "SyncBN", None),
            ("gn", "GN", None),
            ("bn", "BN", None),
            ("cbn", "CBN", CBN_PAPER),
            ("cbn_k4_burnin8ep", "CBN", CBN_OFFICIAL),
            ("naive_cbn", "CBN", {**CBN_PAPER, "rho": 0.0}),  # the ablation without compensation
        )
    ],
    *[
        _config(f"MABN/mask_rcnn_R_50_FPN_2x_{init}_{variant}.yaml", "mabn", "rcnn", weights, 0,
                _rcnn_norms(norm, norm, norm))
        for init, variant, norm, weights in (
            ("scratch", "bn", "BN", ""),
            ("scratch", "brn", "BRN", ""),
            ("scratch", "syncbn", "SyncBN", ""),
            ("scratch", "mabn", "MABN", ""),
            ("finetune", "syncbn", "SyncBN", MSRA_R50),
            ("finetune", "mabn", "MABN", "pretrained/R50-wc.pkl"),  # the authors' weight-centralised R-50
        )
    ],
    *[
        _config(f"MABN/retinanet_R_50_FPN_2x_scratch_{variant}.yaml", "mabn_retinanet", "retinanet", "", 0,
                _retinanet_norms(norm, norm, norm))
        for variant, norm in (("syncbn", "SyncBN"), ("mabn", "MABN"))
    ],
    _config("RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_ema.yaml", "rethinking", "rcnn", MSRA_R50, 2,
            _rcnn_norms("FrozenBN", None, "BN"), precise_bn=False),
    _config("RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_shuffle.yaml", "rethinking", "rcnn", MSRA_R50, 2,
            _rcnn_norms("FrozenBN", None, "BN"), precise_bn=False),
    _config("RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_precise.yaml", "rethinking", "rcnn", MSRA_R50, 2,
            _rcnn_norms("FrozenBN", None, "PreciseBN"), precise_bn=True),
    _config("RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead.yaml", "rethinking_retinanet", "retinanet", MSRA_R50,
            2, _retinanet_norms("FrozenBN", None, "SyncBN"), precise_bn=True),
    # Table 5 row 3: one synchronised BN per tower position for all levels, evaluated with its EMA.
    _config("RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead_shared_population.yaml", "rethinking_retinanet",
            "retinanet", MSRA_R50, 2, _retinanet_norms("FrozenBN", None, "naiveSyncBN"), precise_bn=False,
            shared_head_norms=True),
    # Table 5 row 4: the per-level head, for re-evaluating a row-3 model with recalibrated statistics.
    _config("RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead_shared_population_eval_per_level.yaml",
            "rethinking_retinanet", "retinanet", MSRA_R50, 2, _retinanet_norms("FrozenBN", None, "SyncBN"),
            precise_bn=True),
]

NORM_CLASSES = {
    "FrozenBN": FrozenBatchNorm2d,
    "BN": nn.BatchNorm2d,
    "SyncBN": nn.SyncBatchNorm,
    "naiveSyncBN": NaiveSyncBatchNorm,
    "GN": nn.GroupNorm,
    "CBN": CrossIterationBatchNorm2d,
    "MABN": MovingAverageBatchNorm2d,
    "PreciseBN": PreciseBatchNorm2d,
    "BRN": BatchRenorm2d,
}
# Every normalization layer type (BatchNorm/SyncBN/CBN/PreciseBN/InstanceNorm derive from _NormBase).
_NORM_BASES = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d, MovingAverageBatchNorm2d
)
# Model parts by module-name prefix, most specific first.
_PARTS = (
    ("backbone.bottom_up.", "backbone"),
    ("backbone.", "fpn"),
    ("roi_heads.box_head.", "box_head"),
    ("roi_heads.mask_head.", "mask_head"),
    ("head.", "head"),
)


train_net = load_tool("train_net")


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("paper_configs"))


def setup_cfg(config_file, output_dir, *opts):
    """The config as ``tools/train_net.py --config-file config_file opts...`` sees it."""
    args = default_argument_parser().parse_args(
        ["--config-file", str(config_file), *opts, "OUTPUT_DIR", output_dir]
    )
    return train_net.setup(args)


def norm_types_by_part(model):
    """``{part: {norm class}}`` over every normalization layer; part "elsewhere" if unlisted."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _NORM_BASES):
            part = next((p for prefix, p in _PARTS if name.startswith(prefix)), "elsewhere")
            found.setdefault(part, set()).add(type(module))
    return found


BUILT_IN_DATA_CONFIG_DIRS = ("demo", "study", "cluster_regime")


def _paper_config_paths():
    """Every leaf config under configs/ except the built-in-data ones (demo, studies)."""
    return sorted(
        p.relative_to(CONFIGS).as_posix()
        for p in CONFIGS.rglob("*.yaml")
        if p.relative_to(CONFIGS).parts[0] not in BUILT_IN_DATA_CONFIG_DIRS and not p.name.startswith("Base-")
    )


def test_every_paper_config_is_pinned_by_the_table():
    assert _paper_config_paths() == sorted(p.values[0]["path"] for p in PAPER_CONFIGS)


@pytest.mark.parametrize("row", PAPER_CONFIGS)
def test_config_pins_the_paper_settings(row, output_dir):
    cfg = setup_cfg(CONFIGS / row["path"], output_dir)
    recipe = RECIPES[row["recipe"]]
    solver = cfg.SOLVER

    assert list(cfg.DATASETS.TRAIN) == ["coco_2017_train"] and list(cfg.DATASETS.TEST) == ["coco_2017_val"]
    assert (solver.IMS_PER_BATCH, solver.REFERENCE_WORLD_SIZE) == (16, 8)
    assert solver.BASE_LR == recipe["BASE_LR"]
    assert solver.MAX_ITER == recipe["MAX_ITER"] and tuple(solver.STEPS) == recipe["STEPS"]
    assert solver.GAMMA == 0.1 and solver.MOMENTUM == 0.9 and solver.WEIGHT_DECAY == 1e-4
    assert solver.WARMUP_METHOD == "linear" and solver.WARMUP_ITERS == recipe["WARMUP_ITERS"]
    assert solver.WARMUP_FACTOR == pytest.approx(recipe["WARMUP_FACTOR"])
    assert solver.WEIGHT_DECAY_NORM == recipe["WEIGHT_DECAY_NORM"]
    assert solver.BIAS_LR_FACTOR == recipe["BIAS_LR_FACTOR"]
    bias_weight_decay = solver.WEIGHT_DECAY if solver.WEIGHT_DECAY_BIAS is None else solver.WEIGHT_DECAY_BIAS
    assert bias_weight_decay == recipe["WEIGHT_DECAY_BIAS"]
    clip = solver.CLIP_GRADIENTS
    if recipe["CLIP"] is None:
        assert not clip.ENABLED
    else:
        assert clip.ENABLED and (clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == ("full_model", recipe["CLIP"], 2.0)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == recipe["MIN_SIZE_TRAIN"] and cfg.INPUT.MAX_SIZE_TRAIN == 1333

    assert cfg.MODEL.WEIGHTS == row["weights"]
    assert cfg.MODEL.BACKBONE.FREEZE_AT == row["freeze_at"]
    assert cfg.MODEL.RESNETS.DEPTH == 50
    norms = row["norms"]
    assert cfg.MODEL.RESNETS.NORM == norms["backbone"]
    assert cfg.MODEL.FPN.NORM == (norms["fpn"] or "")
    if row["arch"] == "rcnn":
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)  # 4conv1fc
        assert cfg.MODEL.MASK_ON == Path(row["path"]).name.startswith("mask_rcnn")
    else:
        assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
        assert cfg.MODEL.RETINANET.NORM == norms["head"]

    precise_bn = recipe["PRECISE_BN"] if row["precise_bn"] is None else row["precise_bn"]
    assert cfg.D2NORM.PRECISE_BN.ENABLED is precise_bn
    if row["cbn"] is not None:
        cbn = cfg.D2NORM.CBN
        assert (cbn.WINDOW, cbn.BURNIN_ITERS, cbn.RHO) == (
            row["cbn"]["window"], row["cbn"]["burnin_iters"], row["cbn"].get("rho", 1.0))
    if row["recipe"].startswith("mabn"):
        mabn = cfg.D2NORM.MABN
        assert (mabn.BUFFER_SIZE, mabn.EMA_DECAY, mabn.WARMUP_ITERS, mabn.RENORM_FREE_ITERS, mabn.RMAX) == (
            16, 0.98, 100, 1000, 5.0)
        assert mabn.HEAD_WARMUP_ITERS == 10_000 and mabn.CENTRALIZE_WEIGHTS


def test_cbn_burnin_iterations_are_the_papers_epochs():
    """3 epochs (paper) and 8 of 12 epochs (official repo) of COCO at 16 images per iteration."""
    assert epochs(3) == 21_987 and epochs(8) == 58_633 and epochs(11) == 80_620 and epochs(12) == 87_949
    assert RECIPES["cbn"]["STEPS"][0] == CBN_OFFICIAL["burnin_iters"]  # official CBN starts at the first LR step


@pytest.mark.parametrize("row", PAPER_CONFIGS)
def test_two_images_per_gpu_at_any_gpu_count(row, output_dir):
    cfg = setup_cfg(CONFIGS / row["path"], output_dir)
    for num_gpus in (8, 4):
        scaled = DefaultTrainer.auto_scale_workers(cfg, num_gpus)
        assert scaled.SOLVER.IMS_PER_BATCH / num_gpus == 2


@pytest.mark.parametrize("row", PAPER_CONFIGS)
def test_model_has_the_norm_of_the_config_in_each_place_and_nowhere_else(row, output_dir):
    cfg = setup_cfg(CONFIGS / row["path"], output_dir)
    model = build_model(cfg)

    expected = {part: {NORM_CLASSES[name]} for part, name in row["norms"].items() if name is not None}
    assert norm_types_by_part(model) == expected

    if row["arch"] == "retinanet":
        # One set of statistics per FPN level (every tower norm replicated per level), or one shared.
        num_head_norms = sum(isinstance(m, _NORM_BASES) for m in model.head.modules())
        levels = 1 if row["shared_head_norms"] else len(cfg.MODEL.RETINANET.IN_FEATURES)
        assert num_head_norms == 2 * cfg.MODEL.RETINANET.NUM_CONVS * levels

    if row["cbn"] is not None:
        cbn_layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        expected_cbn = (row["cbn"]["window"], row["cbn"]["burnin_iters"], row["cbn"].get("rho", 1.0))
        assert cbn_layers and all((m.window, m.burnin_iters, m.rho) == expected_cbn for m in cbn_layers)

    if "MABN" in row["norms"].values():
        heads = {id(m) for head in ("roi_heads", "head") if hasattr(model, head)
                 for m in getattr(model, head).modules()}
        mabn_layers = [m for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d)]
        for m in mabn_layers:
            assert (m.buffer_size, m.ema_decay, m.renorm_free_iters, m.rmax) == (16, 0.98, 1000, 5.0)
            assert m.warmup_iters == (10_000 if id(m) in heads else 100)
        # CenConv2d before every MABN: each is fed by a weight-centralised conv.
        fed = [(conv, norm) for conv, norm in conv_norm_pairs(model) if isinstance(norm, MovingAverageBatchNorm2d)]
        assert {id(norm) for _, norm in fed} == {id(m) for m in mabn_layers}
        assert all(is_weight_centralized(conv) for conv, _ in fed)


def _model_zoo_config(name):
    spec = importlib.util.find_spec("detectron2")
    path = Path(spec.submodule_search_locations[0]) / "model_zoo" / "configs" / name
    if not path.is_file():
        pytest.skip(f"detectron2's {name} is not installed with this detectron2")
    return path


@pytest.mark.parametrize("name", ["Base-RCNN-FPN.yaml", "Base-RetinaNet.yaml"])
def test_shipped_base_configs_equal_detectron2s(name):
    """The plugin's copies load to the same config as detectron2's own (anchor eval tag included)."""
    ours, theirs = get_cfg(), get_cfg()
    ours.merge_from_file(str(CONFIGS / name))
    theirs.merge_from_file(str(_model_zoo_config(name)), allow_unsafe=True)
    assert ours.dump() == theirs.dump()


def test_readme_results_tables_have_a_command_for_every_paper_config():
    page = (REPO / "README.md").read_text()
    for path in _paper_config_paths():
        assert f"python tools/train_net.py --config-file configs/{path} --num-gpus 8" in page, path


# ----------------------------------------------------------------------------- 2-iteration runs
def shrink_opts(num_classes):
    """Overrides that keep each family's norms and recipe but make a 2-iteration CPU run quick."""
    return [
        "MODEL.WEIGHTS", "",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes), "MODEL.RETINANET.NUM_CLASSES", str(num_classes),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "DATASETS.TRAIN", "('d2norm_shapes_train',)", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "0", "SOLVER.MAX_ITER", "2",
        "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0", "D2NORM.PRECISE_BN.NUM_ITER", "2",
        # Reach every stage of the d2norm layers within 2 iterations: CBN pools from iteration 2,
        # MABN uses its moving averages and the clipped renorm factor from iteration 2.
        "D2NORM.CBN.BURNIN_ITERS", "1", "D2NORM.MABN.BUFFER_SIZE", "1", "D2NORM.MABN.WARMUP_ITERS", "0",
        "D2NORM.MABN.RENORM_FREE_ITERS", "0", "D2NORM.MABN.HEAD_WARMUP_ITERS", "0",
        # BRN renormalises with its final clip bounds from iteration 1.
        "D2NORM.BRN.WARMUP_ITERS", "0", "D2NORM.BRN.RMAX_ITERS", "1", "D2NORM.BRN.DMAX_ITERS", "1",
    ]


FAMILY_RUNS = [
    "CBN/mask_rcnn_R_50_FPN_1x_cbn.yaml",
    "MABN/mask_rcnn_R_50_FPN_2x_scratch_mabn.yaml",
    "MABN/mask_rcnn_R_50_FPN_2x_scratch_brn.yaml",
    "MABN/retinanet_R_50_FPN_2x_scratch_mabn.yaml",
    "RethinkingBN/mask_rcnn_R_50_FPN_3x_BNhead_precise.yaml",
    "RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead.yaml",
    "RethinkingBN/retinanet_R_50_FPN_3x_SyncBNhead_shared_population.yaml",
]


@pytest.mark.parametrize("path", FAMILY_RUNS)
def test_family_trains_two_iterations_on_the_builtin_dataset(path, tmp_path):
    num_classes = len(MetadataCatalog.get("d2norm_shapes_train").thing_classes)
    cfg = setup_cfg(CONFIGS / path, str(tmp_path), *shrink_opts(num_classes))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert trainer.iter == 2
    losses = [loss for loss, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert os.path.isfile(tmp_path / "model_final.pth")
    # The trained model evaluates (PreciseBN layers were recalibrated at the end of training).
    model = trainer.model
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.zeros(3, 128, 128), "height": 128, "width": 128}])
    assert "instances" in result
