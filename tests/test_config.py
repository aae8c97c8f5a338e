"""The D2NORM config node: paper defaults, and errors that name the offending key."""
import pytest
from detectron2.config import get_cfg

from d2norm import add_d2norm_config, validate_d2norm_config
from d2norm.config.defaults import D2NormConfigError


@pytest.fixture
def cfg():
    cfg = get_cfg()
    add_d2norm_config(cfg)
    return cfg


def test_defaults_follow_the_papers(cfg):
    d = cfg.D2NORM
    assert (d.CBN.WINDOW, d.CBN.BURNIN_ITERS) == (8, 0)
    assert (d.MABN.BUFFER_SIZE, d.MABN.WARMUP_ITERS, d.MABN.RENORM_FREE_ITERS) == (16, 100, 1000)
    assert (d.MABN.RMAX, d.MABN.EMA_DECAY, d.MABN.CENTRALIZE_WEIGHTS) == (5.0, 0.98, True)
    assert (d.PRECISE_BN.NUM_ITER, d.PRECISE_BN.PERIOD) == (200, 0)
    assert d.PRECISE_BN.REGIME == "training"  # as the paper; "inference" is opt-in
    assert (d.MONITOR.ENABLED, d.MONITOR.PERIOD) == (False, 20)
    validate_d2norm_config(cfg)


@pytest.mark.parametrize(
    "key, value",
    [
        ("D2NORM.CBN.WINDOW", 0),
        ("D2NORM.CBN.BURNIN_ITERS", -1),
        ("D2NORM.MABN.BUFFER_SIZE", 0),
        ("D2NORM.MABN.WARMUP_ITERS", -5),
        ("D2NORM.MABN.HEAD_WARMUP_ITERS", -2),
        ("D2NORM.MABN.RENORM_FREE_ITERS", -1),
        ("D2NORM.MABN.RMAX", 0.5),
        ("D2NORM.MABN.EMA_DECAY", 1.0),
        ("D2NORM.MABN.EMA_DECAY", -0.1),
        ("D2NORM.PRECISE_BN.NUM_ITER", 0),
        ("D2NORM.PRECISE_BN.PERIOD", -1),
        ("D2NORM.FREEZE_NORM_LAST_ITERS", -3),
        ("D2NORM.PRECISE_BN.REGIME", "eval"),
        ("D2NORM.PRECISE_BN.MAX_PASSES", -1),
        ("D2NORM.PRECISE_BN.TOLERANCE", -0.1),
        ("D2NORM.MONITOR.PERIOD", 0),
    ],
)
def test_bad_value_names_the_key_and_the_allowed_range(cfg, key, value):
    cfg.merge_from_list([key, value])
    with pytest.raises(D2NormConfigError) as info:
        validate_d2norm_config(cfg)
    assert key in str(info.value)
    assert "allowed" in str(info.value)


def test_values_from_a_yaml_file_are_validated(cfg, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("D2NORM:\n  CBN:\n    WINDOW: 0\n")
    cfg.merge_from_file(str(path))
    with pytest.raises(D2NormConfigError, match="D2NORM.CBN.WINDOW"):
        validate_d2norm_config(cfg)


def test_norm_iteration_counts_follow_detectron2_world_size_scaling(cfg):
    """At 4 GPUs instead of the reference 8, the schedule doubles; so must burn-in and warm-ups."""
    from detectron2.engine import DefaultTrainer

    from d2norm.config.defaults import scale_norm_iterations

    cfg.merge_from_list([
        "SOLVER.IMS_PER_BATCH", 16, "SOLVER.REFERENCE_WORLD_SIZE", 8, "SOLVER.MAX_ITER", 1000,
        "D2NORM.CBN.BURNIN_ITERS", 300, "D2NORM.CBN.WINDOW", 8, "D2NORM.MABN.HEAD_WARMUP_ITERS", 100,
        "D2NORM.MABN.BUFFER_SIZE", 16, "D2NORM.FREEZE_NORM_LAST_ITERS", 50,
    ])
    scaled = DefaultTrainer.auto_scale_workers(scale_norm_iterations(cfg, 4), 4)
    assert scaled.SOLVER.MAX_ITER == 2000
    assert scaled.D2NORM.CBN.BURNIN_ITERS == 600
    assert scaled.D2NORM.MABN.HEAD_WARMUP_ITERS == 200
    assert scaled.D2NORM.FREEZE_NORM_LAST_ITERS == 100
    assert (scaled.D2NORM.CBN.WINDOW, scaled.D2NORM.MABN.BUFFER_SIZE) == (8, 16)
    assert scale_norm_iterations(cfg, 8) is cfg


def test_mabn_warmup_and_renorm_free_phase_follow_the_schedule_on_fewer_gpus(cfg):
    """MABN's schedule (Yan et al. 2020 Sec. 4.3: BN statistics while warming up, then a phase with
    renormalization disabled) is measured in iterations, so it stretches with ``MAX_ITER``; a head
    warm-up of -1 inherits the (already rescaled) trunk warm-up, not a second rescaling."""
    from d2norm.config.defaults import scale_norm_iterations
    from d2norm.modeling.registry import configured_factory

    cfg.merge_from_list([
        "SOLVER.IMS_PER_BATCH", 16, "SOLVER.REFERENCE_WORLD_SIZE", 8, "SOLVER.MAX_ITER", 1000,
        "D2NORM.MABN.WARMUP_ITERS", 100, "D2NORM.MABN.RENORM_FREE_ITERS", 1000,
        "D2NORM.MABN.HEAD_WARMUP_ITERS", -1, "D2NORM.CBN.BURNIN_ITERS", 300,
    ])
    scaled = scale_norm_iterations(cfg, 4)
    assert scaled.D2NORM.MABN.WARMUP_ITERS == 200 and scaled.D2NORM.MABN.RENORM_FREE_ITERS == 2000
    assert scaled.D2NORM.CBN.BURNIN_ITERS == 600 and scaled.D2NORM.MABN.HEAD_WARMUP_ITERS == -1
    layer = configured_factory("MABN", scaled.D2NORM)(8)
    assert (layer.warmup_iters, layer.renorm_free_iters) == (200, 2000)
    assert configured_factory("MABN", scaled.D2NORM, in_head=True)(8).warmup_iters == 200  # rescaled once
