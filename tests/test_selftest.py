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
