"""``python -m d2norm.selftest``: the CPU mode passes every check; asking for CUDA without it says so."""
import torch

from d2norm import selftest


def test_every_check_passes_on_the_cpu(tmp_path, capsys):
    table = tmp_path / "selftest.md"
    assert selftest.main(["--device", "cpu", "--markdown", str(table)]) == 0
    rows = table.read_text().splitlines()[4:]
    checks = {row.split(" | ")[0].lstrip("| ") for row in rows}
    assert {"float32 vs CPU float64", "channels_last", "compile", "no host sync", "autocast bfloat16",
            "DDP step"} <= checks
    assert len(rows) == len(checks) * len(selftest.LAYERS) and all("| pass |" in row for row in rows)
    assert f"{len(rows)} of {len(rows)} checks passed" in capsys.readouterr().out


def test_a_failing_check_is_reported_and_fails_the_run(monkeypatch):
    monkeypatch.setitem(selftest.LAYERS, "broken", lambda c: torch.nn.BatchNorm2d(c, momentum=0.5))
    monkeypatch.setattr(selftest, "check_float32", lambda name, device: (1.0 if name == "broken" else 0.0, 1e-4))
    rows = selftest.run_checks("cpu", layers=["broken"], report=lambda line: None)
    float32_rows = [row[:3] for row in rows if row[0] == "float32 vs CPU float64"]
    assert float32_rows == [("float32 vs CPU float64", "broken", False)]


def test_cuda_without_cuda_exits_with_its_own_code(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selftest.main(["--device", "cuda"]) == selftest.NO_CUDA_EXIT
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_benchmark_and_demo_stages_run_the_tools_and_report_their_numbers(capsys):
    """At toy size on the CPU: the norm-cost benchmark's CBN/BN and MABN/BN ratios, and a 2-iteration
    demo training with its COCO AP, each a row of the table."""
    toy = ["--shapes", "8x8", "--repeats", "1", "--skip-detector", "--threads", "1"]
    benchmark = selftest.run_benchmark("cpu", toy, report=lambda line: None)
    assert [row[1] for row in benchmark] == ["CBN/BN", "MABN/BN"] and all(row[2] for row in benchmark)
    assert all(row[0] == "norm-cost benchmark: block C=8, 8²" and "time ratio" in row[5] for row in benchmark)
    tiny = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
            "DATASETS.TRAIN", "('d2norm_shapes_val',)", "DATASETS.TEST", "('d2norm_shapes_val',)",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64", "D2NORM.MONITOR.ENABLED", "False", "D2NORM.PRECISE_BN.NUM_ITER", "1"]
    (demo,) = selftest.run_demo("cpu", tiny, report=lambda line: None)
    assert demo[:3] == ("demo training", "MABN demo", True) and demo[5].startswith("box AP ")
    table = selftest.markdown([*benchmark, demo], "cpu")
    assert "| demo training | MABN demo | pass |" in table and "| — |" in table


def test_a_stage_that_cannot_run_is_a_failed_row(monkeypatch):
    monkeypatch.setattr(selftest, "REPO", selftest.REPO / "not-a-checkout")
    (row,) = selftest.run_demo("cpu", report=lambda line: None)
    assert row[2] is False and "this stage runs from a d2norm checkout" in row[5]
