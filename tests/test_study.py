"""The study tool (``python -m d2norm.study``) from a user's point of view.

The runner is exercised with a stand-in for ``tools/train_net.py`` that writes what the real one
writes (``config.yaml``, ``metrics.json``, ``evaluation.json``, checkpoints) in milliseconds, so
that resuming, skipping, failures and evaluation variants are checked without training; the
``--eval-only`` recalibration path of the real ``train_net.py`` is checked on a tiny detector.
"""
import dataclasses
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from test_train_net import DEMO_BASE, parse, tiny_opts, tiny_splits  # noqa: F401  (fixture)
from tool_scripts import load_tool

from d2norm import add_d2norm_config
from d2norm.study import (
    CellFailedError,
    StudyFileError,
    StudyRunner,
    aggregate,
    gap_fractions,
    load_study,
    markdown_table,
    read_study,
    write_report,
)
from d2norm.study.__main__ import parse_args
from d2norm.study.matrix import NORM_KEYS

REPO = Path(__file__).resolve().parents[1]
STUDY_CONFIG = REPO / "configs" / "study" / "mask_rcnn_R_18_FPN_shapes_scratch.yaml"

FAKE_TRAIN_NET = textwrap.dedent('''
    """Stand-in for tools/train_net.py (no detectron2 import, so it starts fast): reads the
    schedule from the config file and the overrides, logs its argv, writes train_net's outputs."""
    import json, os, sys
    from pathlib import Path
    import yaml

    argv = sys.argv[1:]
    config = yaml.safe_load(open(argv[argv.index("--config-file") + 1]))
    opts = argv[argv.index("--num-gpus") + 2:]
    pairs = dict(zip(opts[::2], opts[1::2]))
    out = Path(pairs["OUTPUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent.parent.parent / "calls.log", "a") as f:
        f.write(json.dumps(argv) + "\\n")
    if os.environ.get("FAKE_FAIL") == str(out):
        sys.exit(3)
    if "--eval-only" in argv and not Path(pairs["MODEL.WEIGHTS"]).exists():
        sys.exit(4)
    solver = {key: int(pairs.get("SOLVER." + key, config["SOLVER"][key])) for key in ("IMS_PER_BATCH", "MAX_ITER")}
    norm = pairs.get("MODEL.FPN.NORM", config.get("MODEL", {}).get("FPN", {}).get("NORM", ""))
    (out / "config.yaml").write_text(yaml.safe_dump({"SOLVER": solver, "MODEL": {"FPN": {"NORM": norm}}}))
    if "--eval-only" not in argv:
        with open(out / "metrics.json", "a") as f:
            for i in range(solver["MAX_ITER"]):
                f.write(json.dumps({"iteration": i, "total_loss": 2.0 / (i + 1), "time": 0.5}) + "\\n")
        for name in ("model_0000001.pth", "model_final.pth", "last_checkpoint"):
            (out / name).write_text("x")
    recalibrated = pairs.get("D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY") == "True"
    ap = 10.0 * int(pairs["SEED"]) + (0.5 if recalibrated else 0.0) + (1.0 if norm == "GN" else 0.0)
    (out / "evaluation.json").write_text(json.dumps({"bbox": {"AP": ap, "AP50": 2 * ap}, "segm": {"AP": ap / 2}}))
''')


FAKE_RECALIBRATE = textwrap.dedent('''
    """Stand-in for tools/recalibrate.py: logs its argv and writes the checkpoint it was asked for."""
    import json, sys
    from pathlib import Path

    argv = sys.argv[1:]
    output = Path(argv[argv.index("--output") + 1])
    with open(output.parent.parent.parent.parent / "calls.log", "a") as f:
        f.write(json.dumps(["recalibrate.py", *argv]) + "\\n")
    output.write_text("x")
''')


def write_study(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def study_file(tmp_path):
    return write_study(tmp_path, f"""
        configs: [{STUDY_CONFIG}]
        seeds: [1, 2]
        variants:
          BN@2: {{norm: BN, overrides: {{SOLVER.MAX_ITER: 4}}}}
          BN@2+PreciseBN: {{evaluate: BN@2, recalibrate: true}}
          GN: {{norm: GN, overrides: {{SOLVER.MAX_ITER: 4, SOLVER.STEPS: [2, 3]}}}}
        """)


@pytest.fixture
def fake_runner(tmp_path):
    script = tmp_path / "fake_train_net.py"
    script.write_text(FAKE_TRAIN_NET)
    (tmp_path / "recalibrate.py").write_text(FAKE_RECALIBRATE)
    return StudyRunner(tmp_path / "out", script, poll_seconds=30)


def calls(tmp_path):
    log = tmp_path / "out" / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_cells_run_seed_by_seed_with_evaluations_right_after_their_trainings(study_file):
    cells = load_study(study_file)
    assert [(c.variant.name, c.seed) for c in cells] == [
        ("BN@2", 1), ("BN@2+PreciseBN", 1), ("GN", 1), ("BN@2", 2), ("BN@2+PreciseBN", 2), ("GN", 2)]


def test_a_target_domain_variant_recalibrates_the_trained_weights_without_labels_then_evaluates(tmp_path,
                                                                                                fake_runner):
    path = write_study(tmp_path, f"""
        configs: [{STUDY_CONFIG}]
        seeds: [1]
        variants:
          BN: {{norm: BN, overrides: {{SOLVER.MAX_ITER: 2}}}}
          BN@shifted+recalibrated: {{evaluate: BN, recalibrate_on: d2norm_shapes_shifted_train,
                                     overrides: {{DATASETS.TEST: [d2norm_shapes_shifted_val]}}}}
        """)
    records = fake_runner.run(load_study(path), log=lambda line: None)
    trained = tmp_path / "out" / STUDY_CONFIG.stem / "BN" / "seed1"
    cell = tmp_path / "out" / STUDY_CONFIG.stem / "BN@shifted+recalibrated" / "seed1"
    recalibration, evaluation = calls(tmp_path)[1:]
    assert recalibration[0] == "recalibrate.py"
    flags = dict(zip(recalibration[1::2], recalibration[2::2]))
    assert flags["--weights"] == str(trained / "model_final.pth") and flags["--images"] == "d2norm_shapes_shifted_train"
    assert flags["--config-file"] == str(trained / "config.yaml")
    start = evaluation.index("--num-gpus") + 2
    opts = dict(zip(evaluation[start::2], evaluation[start + 1::2]))
    assert opts["MODEL.WEIGHTS"] == str(cell / "recalibrated.pth")
    assert opts["DATASETS.TEST"] == "('d2norm_shapes_shifted_val',)"
    assert opts["D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY"] == "False"
    assert records[1]["recalibrated_on"] == "d2norm_shapes_shifted_train" and records[1]["evaluates"] == "BN"


def test_norm_sets_every_norm_key_and_overrides_merge_into_detectron2_config(study_file):
    gn = next(c for c in load_study(study_file) if c.variant.name == "GN")
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(str(STUDY_CONFIG))
    cfg.merge_from_list(gn.opts())
    assert {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM,
            cfg.MODEL.RETINANET.NORM} == {"GN"}
    assert len(NORM_KEYS) == 5
    assert cfg.SOLVER.STEPS == (2, 3) and cfg.SOLVER.MAX_ITER == 4 and cfg.SEED == gn.seed


@pytest.mark.parametrize("variants, message", [
    ("{A: {norm: BN, lr: 1}}", "'variants.A' has unknown keys ['lr']"),
    ("{A: {evaluate: B}}", "'variants.A.evaluate' = 'B' must name a trained variant: []"),
    ("{A: {norm: BN}, B: {evaluate: A, recalibrate: true, recalibrate_on: d}}",
     "'variants.B.recalibrate_on' needs 'evaluate' and excludes 'recalibrate: true'"),
    ("{A: {norm: BN, recalibrate_on: d}}", "'variants.A.recalibrate_on' needs 'evaluate'"),
    ("{A: {norm: BN}, B: {evaluate: A, recalibrate: yes please}}", "'variants.B.recalibrate' must be true or false"),
    ("{A: {overrides: [SOLVER.MAX_ITER, 3]}}", "'variants.A.overrides' must map detectron2 keys to values"),
])
def test_a_bad_study_file_names_the_file_and_the_key(tmp_path, variants, message):
    path = write_study(tmp_path, f"configs: [a.yaml]\nseeds: [1]\nvariants: {variants}\n")
    with pytest.raises(StudyFileError) as e:
        load_study(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_selecting_an_evaluation_variant_keeps_the_training_it_evaluates(study_file):
    cells = load_study(study_file, only_variants=["BN@2+PreciseBN"], only_seeds=[2])
    assert [(c.variant.name, c.seed) for c in cells] == [("BN@2", 2), ("BN@2+PreciseBN", 2)]
    with pytest.raises(StudyFileError, match=r"unknown variants \['SyncBN'\]"):
        load_study(study_file, only_variants=["SyncBN"])


def test_run_records_every_cell_then_skips_finished_cells(study_file, fake_runner, tmp_path):
    cells = load_study(study_file)
    lines = []
    records = fake_runner.run(cells, log=lines.append)
    assert len(calls(tmp_path)) == 6
    by_cell = {(r["variant"], r["seed"]): r for r in records}
    assert by_cell[("BN@2", 2)]["box_ap"] == 20.0 and by_cell[("GN", 1)]["box_ap"] == 11.0
    assert by_cell[("BN@2+PreciseBN", 1)]["box_ap"] == 10.5  # recalibrated evaluation of BN@2's weights
    assert by_cell[("BN@2+PreciseBN", 1)]["iterations"] == 4 and by_cell[("BN@2", 1)]["seconds_per_iter"] == 0.5
    assert set(records[0]) >= {"variant", "seed", "images_per_batch", "iterations", "box_ap", "mask_ap",
                               "seconds_per_iter", "config", "commit"}
    assert "[study] 6 cells: 0 finished, 6 to run" in lines and any("ETA" in line for line in lines[2:])
    trained = cells[0].directory(fake_runner.output)
    assert sorted(p.name for p in trained.glob("model_*.pth")) == ["model_final.pth"]  # intermediates deleted

    again = []
    assert fake_runner.run(cells, log=again.append) == records
    assert len(calls(tmp_path)) == 6 and again == ["[study] 6 cells: 6 finished, 0 to run"]


def test_commands_resume_trainings_and_evaluate_trained_weights(study_file, fake_runner):
    train, evaluation = load_study(study_file)[:2]
    command = fake_runner.command(train)
    assert "--resume" in command and "--eval-only" not in command
    assert command[-2:] == ["OUTPUT_DIR", str(train.directory(fake_runner.output))]
    command = fake_runner.command(evaluation)
    trained = train.directory(fake_runner.output)
    assert "--eval-only" in command
    assert command[command.index("D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY") + 1] == "True"
    assert command[command.index("--config-file") + 1] == str(trained / "config.yaml")
    assert command[command.index("MODEL.WEIGHTS") + 1] == str(trained / "model_final.pth")
    assert "--dist-url" not in command  # one process: no port
    eight = dataclasses.replace(train, workers=8)
    command = fake_runner.command(eight)
    # 8 gloo processes on a free port of their own: two studies on one machine never collide
    launch = command.index("--num-gpus")
    assert command[launch:launch + 4] == ["--num-gpus", "8", "--dist-url", "auto"]


def test_a_failed_cell_names_its_log_and_the_rerun_continues_there(study_file, fake_runner, tmp_path, monkeypatch):
    cells = load_study(study_file)
    failing = cells[2].directory(fake_runner.output)
    monkeypatch.setenv("FAKE_FAIL", str(failing))
    with pytest.raises(CellFailedError, match=r"GN / seed 1 failed \(exit 3\); see .*study_stdout.log"):
        fake_runner.run(cells, log=lambda line: None)
    monkeypatch.delenv("FAKE_FAIL")
    fake_runner.run(cells, log=lambda line: None)
    assert [c[c.index("OUTPUT_DIR") + 1] for c in calls(tmp_path)].count(str(failing)) == 2
    assert len(calls(tmp_path)) == 7


def test_records_of_a_committed_results_file_count_as_finished_cells(study_file, fake_runner, tmp_path, capsys):
    """A study resumes on another machine from its committed results.json: recorded cells are not
    trained again, and the report covers them and the new ones."""
    from d2norm.study.__main__ import main

    results = tmp_path / "results"
    main(["run", str(study_file), "--output", str(tmp_path / "out"), "--results", str(results),
          "--train-net", str(fake_runner.train_net), "--seeds", "1"])
    assert len(calls(tmp_path)) == 3
    main(["run", str(study_file), "--output", str(tmp_path / "elsewhere"), "--results", str(results),
          "--train-net", str(fake_runner.train_net)])
    log = tmp_path / "elsewhere" / "calls.log"
    assert [json.loads(line)[json.loads(line).index("SEED") + 1] for line in log.read_text().splitlines()] == ["2"] * 3
    assert sorted((r["variant"], r["seed"]) for r in json.loads((results / "results.json").read_text())) == [
        ("BN@2", 1), ("BN@2", 2), ("BN@2+PreciseBN", 1), ("BN@2+PreciseBN", 2), ("GN", 1), ("GN", 2)]
    assert "[study] 6/6 cells finished" in capsys.readouterr().out


def test_report_gives_mean_and_spread_over_seeds_and_writes_plots(study_file, fake_runner, tmp_path):
    cells = load_study(study_file)
    records = fake_runner.run(cells, log=lambda line: None)
    summary = aggregate(records)
    bn = summary[(STUDY_CONFIG.stem, "BN@2")]
    assert bn["box_ap"] == [10.0, 20.0] and bn["box_mean"] == 15.0 and bn["box_std"] == pytest.approx(7.0711, 1e-4)
    table = markdown_table(summary)
    assert "| BN@2 | 2 | 4 | 2 | 15.0 ± 7.1 | 10.0, 20.0 | 7.5 ± 3.5 |" in table
    by_key = {(c.variant.name, c.seed): c for c in cells}
    write_report(records, tmp_path / "report",
                 lambda r: by_key[(r["variant"], r["seed"])].directory(fake_runner.output))
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == records
    for png in ("final_ap.png", "loss.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _gate_records(per_worker, synced):
    """Records of BN and SyncBN cells with the given box APs (mask AP = box AP), one per seed."""
    return [{"config": "c.yaml", "variant": variant, "seed": seed, "box_ap": ap, "mask_ap": ap,
             "images_per_batch": 16, "iterations": 10, "seconds_per_iter": 1.0}
            for variant, aps in (("BN", per_worker), ("SyncBN", synced)) for seed, ap in enumerate(aps, 1)]


@pytest.mark.parametrize("per_worker, synced, verdict", [
    ([10.0, 10.2, 9.8], [12.0, 12.2, 11.8], "larger: the regime shows the problem (SyncBN ahead)"),
    ([10.0, 11.0, 9.0], [11.0, 12.0, 10.0], "not larger"),  # gap 1.0, twice the spread 2.0
    ([12.0, 12.2, 11.8], [10.0, 10.2, 9.8], "not larger"),  # per-worker BN ahead: no problem shown
    ([10.0], [12.0], "not decided: a spread needs at least 2 seeds of each"),
])
def test_the_gate_needs_synced_bn_ahead_by_more_than_twice_the_seed_spread(per_worker, synced, verdict):
    table = markdown_table(aggregate(_gate_records(per_worker, synced)), {"per_worker": "BN", "synced": "SyncBN"})
    gap = sum(synced) / len(synced) - sum(per_worker) / len(per_worker)
    assert f"- c, box AP: gap SyncBN − BN = {gap:+.1f} over {len(synced)} seeds" in table
    assert f"; {verdict}." in table


@pytest.mark.parametrize("per_worker, synced, verdict", [
    # seeds differ by 3 AP, SyncBN ahead by 1.0 ± 0.1 on each: the spread rule cannot see it, pairing can
    ([10.0, 13.0, 16.0], [11.1, 13.9, 17.0], "larger: the regime shows the problem (SyncBN ahead)"),
    ([10.0, 13.0, 16.0], [12.0, 12.0, 17.0], "not larger"),  # differences +2, -1, +1: mean 0.67, 2 se 1.76
    ([10.0], [12.0], "not decided: a paired gate needs at least 2 seeds of both"),
])
def test_the_paired_gate_compares_the_mean_per_seed_difference_with_twice_its_standard_error(
        per_worker, synced, verdict):
    gap = {"per_worker": "BN", "synced": "SyncBN", "gate": "paired"}
    summary = aggregate(_gate_records(per_worker, synced))
    gate = gap_fractions(summary, gap)["c"]["box"]
    differences = [s - p for s, p in zip(synced, per_worker)]
    assert gate.size == pytest.approx(sum(differences) / len(differences))
    if len(differences) > 1:
        sd = statistics.stdev(differences)
        assert gate.threshold == pytest.approx(2 * sd / len(differences) ** 0.5)
    table = markdown_table(summary, gap)
    assert f"- c, box AP: mean per-seed gap SyncBN − BN = {gate.size:+.1f} over {len(differences)} seeds; " \
           f"twice its standard error = {gate.threshold:.1f}; {verdict}." in table


def test_the_paired_gate_pairs_only_the_seeds_both_variants_have():
    records = _gate_records([10.0, 13.0, 16.0], [11.0, 14.0])  # SyncBN seed 3 not finished
    gate = gap_fractions(aggregate(records), {"per_worker": "BN", "synced": "SyncBN", "gate": "paired"})["c"]["box"]
    assert gate.seeds == 2 and gate.size == pytest.approx(1.0) and gate.threshold == pytest.approx(0.0)


def test_a_study_file_names_an_unknown_gate_rule(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("configs: [c.yaml]\nseeds: [1]\nvariants: {BN: {norm: BN}, S: {norm: SyncBN}}\n"
                    "gap: {per_worker: BN, synced: S, gate: t-test}\n")
    with pytest.raises(StudyFileError, match=r"gate.yaml: 'gap.gate' = 't-test' must be one of \['spread', 'paired'\]"):
        read_study(path)


def test_cli_takes_trailing_overrides_and_rejects_unknown_flags(capsys):
    args = parse_args(["run", "s.yaml", "--threads", "1", "DATASETS.TRAIN", "('coco_2017_train',)"])
    assert args.threads == 1 and args.opts == ["DATASETS.TRAIN", "('coco_2017_train',)"]
    with pytest.raises(SystemExit):
        parse_args(["run", "s.yaml", "--thread", "1"])
    assert "unrecognized arguments ['--thread']" in capsys.readouterr().err


def test_the_shipped_study_files_load_and_name_existing_configs():
    cells = load_study(REPO / "benchmarks" / "small_batch" / "study.yaml")
    names = {c.variant.name for c in cells}
    assert {"BN@2", "BN@16", "GN", "CBN", "MABN", "BN@2+PreciseBN"} <= names
    assert {c.seed for c in cells} >= {1, 2, 3}
    paper = load_study(REPO / "benchmarks" / "paper" / "coco_small_batch.yaml")
    assert {c.config_stem for c in paper} >= {"mask_rcnn_R_50_FPN_1x_cbn", "mask_rcnn_R_50_FPN_2x_scratch_mabn"}
    (reference,) = load_study(REPO / "benchmarks" / "small_batch" / "large_batch_reference.yaml")
    # the same-iterations reference: the study's config and schedule, 8x the images per iteration
    assert reference.config == cells[0].config and reference.variant.overrides["SOLVER.IMS_PER_BATCH"] == 16
    assert "SOLVER.MAX_ITER" not in reference.variant.overrides
    assert all((REPO / c.config).is_file() for c in cells + paper)


def test_eval_only_recalibration_recomputes_statistics_and_saves_the_evaluation(tiny_splits, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    """``train_net.py --eval-only D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY True`` (the evaluation
    variants' command): population statistics from training batches, then COCO evaluation, whose
    results land in ``OUTPUT_DIR/evaluation.json``."""
    import torch

    train_net = load_tool("train_net")
    opts = tiny_opts("BN", tmp_path, tiny_splits, max_iter=2) + ["TEST.EVAL_PERIOD", "0",
                                                                  "D2NORM.PRECISE_BN.ENABLED", "False"]
    train_net.main(parse(["--config-file", str(DEMO_BASE), *opts]))
    weights = tmp_path / "model_final.pth"
    stored = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    seen = {}
    build = train_net.Trainer.build_model

    def keep_model(cfg):
        seen["model"] = build(cfg)
        return seen["model"]

    monkeypatch.setattr(train_net.Trainer, "build_model", staticmethod(keep_model))
    results = train_net.main(parse(["--config-file", str(DEMO_BASE), "--eval-only", *opts, "MODEL.WEIGHTS",
                                    str(weights), "D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY", "True"]))
    state = seen["model"].state_dict()
    key = "backbone.bottom_up.stem.conv1.norm.running_var"
    assert not torch.equal(state[key], stored[key])  # recalibrated, not the EMA of the checkpoint
    assert json.loads((tmp_path / "evaluation.json").read_text()) == json.loads(json.dumps(results))


def test_module_help_runs():
    out = subprocess.run([sys.executable, "-m", "d2norm.study", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "run: train/evaluate unfinished cells" in out.stdout


def test_cbn_window_probe_leaves_training_unchanged_and_is_exact_where_nothing_moved(tiny_splits, tmp_path):  # noqa: F811
    """tools/cbn_window_error.py: probing restores every buffer and the RNG (the trained weights are
    the same with and without probes), and with a zero learning rate the stem's CBN, whose input is
    the image, holds the statistics its past batches have now (error 0 up to float32 rounding)."""
    import torch

    tool = load_tool("cbn_window_error")
    opts = tiny_opts("CBN", tmp_path, tiny_splits, max_iter=6) + ["D2NORM.CBN.WINDOW", "3",
                                                                   "D2NORM.CBN.BURNIN_ITERS", "2"]
    cfg = load_tool("train_net").setup(parse(["--config-file", str(DEMO_BASE), *opts]))
    cfg.defrost()
    records, probed = tool.train_and_probe(cfg, 5, 1, tmp_path / "probed", log=lambda line: None)
    _, plain = tool.train_and_probe(cfg, 5, 100, tmp_path / "plain", log=lambda line: None)
    for (name, a), b in zip(probed.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["burning_in"] for r in records] == [True, True, False, False, False]
    assert sorted(records[-1]["ages"]) == [1, 2] and (tmp_path / "probed" / "window_error.png").exists()

    cfg.SOLVER.BASE_LR = 0.0
    records, _ = tool.train_and_probe(cfg, 5, 5, tmp_path / "frozen", log=lambda line: None)
    stem = records[-1]["age1_mean_error_per_layer"]["backbone.bottom_up.stem.conv1.norm"]
    assert stem["compensated"] < 1e-6 and stem["raw"] < 1e-6 and stem["spread"] > 1e-3  # float32 window
