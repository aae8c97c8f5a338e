"""Run the cells of a study through ``tools/train_net.py``, resumably, with progress and ETA.

Each cell is a ``train_net.py`` process (``--num-gpus`` as given) writing into its own directory.
A cell is *finished* when its directory holds ``study_record.json``: finished cells are skipped, an
interrupted one is restarted with ``--resume`` (detectron2 continues from its last checkpoint).
When a cell finishes, its record (AP, time per iteration, ...) is written and its intermediate
checkpoints are deleted (``model_final.pth`` stays, for evaluation variants and re-evaluation).
"""
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .matrix import Cell, Variant
from .metrics import cell_solver, evaluation_results, read_metrics, seconds_per_iter

__all__ = ["CellFailedError", "StudyRunner", "cell_key", "read_record"]

RECORD_NAME = "study_record.json"
RECALIBRATED_NAME = "recalibrated.pth"  # an evaluation cell's weights recalibrated on its recalibrate_on images


class CellFailedError(RuntimeError):
    """A cell's ``train_net.py`` process failed; the message names the cell and its log."""


def cell_key(config, variant, seed):
    """The identity of a cell (and of its record) across machines."""
    return (Path(config).as_posix(), variant, seed)


def read_record(cell, output, known=None):
    """The record of a finished cell: from its directory, else from ``known`` (``{cell_key: record}``,
    e.g. a committed ``results.json``), else None."""
    path = cell.directory(output) / RECORD_NAME
    if path.exists():
        return json.loads(path.read_text())
    return (known or {}).get(cell_key(cell.config, cell.variant.name, cell.seed))


def git_commit(root):
    """Short commit of the repository at ``root`` (``-dirty`` with uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _ap(value):
    return "—" if value is None else f"{value:.1f}"


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class StudyRunner:
    """Runs cells in order through the ``train_net.py`` at ``train_net``.

    Args:
        output: root directory of the cells.
        num_gpus: ``--num-gpus`` of every cell (processes; gloo on CPU without GPUs); None: the
            study file's ``workers``.
        threads: ``OMP_NUM_THREADS`` of each cell process (None: inherit).
        poll_seconds: how often the running cell's iteration and loss are printed.
        extra_opts: ``KEY VALUE`` overrides appended to every cell (e.g. dataset names on COCO).
    """

    output: Path
    train_net: Path
    num_gpus: int = None
    threads: int = None
    poll_seconds: float = 60.0
    extra_opts: tuple = ()

    def run(self, cells, log=print, known=None):
        """Run every unfinished cell of ``cells`` in order; return the records of all of them.
        ``known`` records (see :func:`read_record`) count as finished cells."""
        commit = git_commit(Path(self.train_net).resolve().parents[1])
        pending = [c for c in cells if read_record(c, self.output, known) is None]
        log(f"[study] {len(cells)} cells: {len(cells) - len(pending)} finished, {len(pending)} to run")
        schedules = [cell_solver(c.config, c.variant.overrides, self.workers(c))[:2] for c in pending]
        seconds_per_image = []  # wall seconds per trained image, of the cells trained now
        for index, cell in enumerate(pending):
            images, iterations = schedules[index]
            eta = ""
            if seconds_per_image and any(c.variant.trains for c in pending[index:]):
                work = sum(i * n for c, (i, n) in zip(pending[index:], schedules[index:]) if c.variant.trains)
                eta = f"; ETA {format_seconds(work * sum(seconds_per_image) / len(seconds_per_image))}"
            log(f"[study] cell {len(cells) - len(pending) + index + 1}/{len(cells)}: {cell.config_stem} / "
                f"{cell.variant.name} / seed {cell.seed}{eta}")
            started = time.time()
            record = self._run_cell(cell, commit, iterations, log)
            if cell.variant.trains:
                seconds_per_image.append((time.time() - started) / (images * iterations))
            log(f"[study] done in {format_seconds(time.time() - started)}: box AP {_ap(record['box_ap'])}, "
                f"mask AP {_ap(record['mask_ap'])}")
        return [read_record(c, self.output, known) for c in cells]

    def workers(self, cell):
        """Processes of a cell: ``num_gpus`` if given, else the study file's ``workers``."""
        return cell.workers if self.num_gpus is None else self.num_gpus

    def trained_directory(self, cell):
        """Directory of the trained cell an evaluation cell evaluates (same config and seed)."""
        return Cell(cell.config, Variant(cell.variant.evaluate), cell.seed).directory(self.output)

    def command(self, cell):
        """The ``train_net.py`` command line of a cell."""
        if cell.variant.trains:
            head = ["--config-file", cell.config, "--resume"]
            opts = cell.opts()
        else:
            trained = self.trained_directory(cell)
            head = ["--config-file", str(trained / "config.yaml"), "--eval-only"]
            weights = (cell.directory(self.output) / RECALIBRATED_NAME if cell.variant.recalibrate_on
                       else trained / "model_final.pth")
            opts = cell.opts() + ["MODEL.WEIGHTS", str(weights),
                                  "D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY", str(cell.variant.recalibrate)]
        # A free port per cell: two studies (or any other job) on one machine never share one.
        launch = ["--num-gpus", str(self.workers(cell))] + (["--dist-url", "auto"] if self.workers(cell) > 1 else [])
        return ([sys.executable, str(self.train_net)] + head + launch + opts
                + list(self.extra_opts) + ["OUTPUT_DIR", str(cell.directory(self.output))])

    def recalibration_command(self, cell):
        """The ``tools/recalibrate.py`` command of an evaluation cell with ``recalibrate_on`` (else
        None): the trained weights, their statistics recomputed on its images without labels."""
        if not cell.variant.recalibrate_on:
            return None
        trained = self.trained_directory(cell)
        return [sys.executable, str(Path(self.train_net).with_name("recalibrate.py")),
                "--config-file", str(trained / "config.yaml"), "--weights", str(trained / "model_final.pth"),
                "--images", cell.variant.recalibrate_on,
                "--output", str(cell.directory(self.output) / RECALIBRATED_NAME), *self.extra_opts]

    def _run_cell(self, cell, commit, iterations, log):
        directory = cell.directory(self.output)
        directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        commands = [c for c in (self.recalibration_command(cell), self.command(cell)) if c is not None]
        (directory / "study_command.txt").write_text("".join(" ".join(c) + "\n" for c in commands))
        started = time.time()
        for command in commands:
            with open(directory / "study_stdout.log", "a") as stdout:
                process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env)
                while True:
                    try:
                        process.wait(timeout=self.poll_seconds)
                        break
                    except subprocess.TimeoutExpired:
                        self._log_progress(directory, iterations, started, log)
            if process.returncode != 0:
                raise CellFailedError(f"cell {cell.config_stem} / {cell.variant.name} / seed {cell.seed} failed "
                                      f"(exit {process.returncode}); see {directory / 'study_stdout.log'}")
        record = self._record(cell, commit, time.time() - started)
        (directory / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
        for checkpoint in directory.glob("model_*.pth"):
            if checkpoint.name != "model_final.pth":
                checkpoint.unlink()
        return record

    @staticmethod
    def _log_progress(directory, iterations, started, log):
        records = read_metrics(directory / "metrics.json")
        if records:
            last = max(records)
            loss = records[last].get("total_loss")
            log(f"[study]   iteration {min(last + 1, iterations)}/{iterations}"
                + (f", loss {loss:.3f}" if loss is not None else "")
                + f", {format_seconds(time.time() - started)} elapsed")

    def _record(self, cell, commit, wall_seconds):
        directory = cell.directory(self.output)
        box_ap, box_ap50, mask_ap = evaluation_results(directory)
        trained = directory if cell.variant.trains else self.trained_directory(cell)
        trained_record = None if cell.variant.trains else json.loads((trained / RECORD_NAME).read_text())
        workers = self.workers(cell)
        images, iterations, lr = cell_solver(str(trained / "config.yaml"), {}, workers)
        return {
            "arm": cell.arm,
            "variant": cell.variant.name,
            "seed": cell.seed,
            "config": cell.config,
            "images_per_batch": images,
            "workers": workers,
            "images_per_worker": images / workers,
            "lr": lr,
            "iterations": iterations,
            "box_ap": box_ap,
            "box_ap50": box_ap50,
            "mask_ap": mask_ap,
            "seconds_per_iter": (seconds_per_iter(read_metrics(directory / "metrics.json")) if trained_record is None
                                 else trained_record["seconds_per_iter"]),
            "evaluates": cell.variant.evaluate,
            "recalibrated": cell.variant.recalibrate,
            "recalibrated_on": cell.variant.recalibrate_on,
            "wall_seconds": round(wall_seconds, 1),
            "threads": self.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "commit": commit,
        }
