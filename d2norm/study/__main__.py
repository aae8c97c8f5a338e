"""``python -m d2norm.study {run,report} STUDY.yaml``: train the matrix of a study file, or only
aggregate the cells finished so far. See :mod:`d2norm.study.matrix` for the study file."""
import argparse
import json
import sys
from pathlib import Path

from .matrix import StudyFileError, load_study, read_study
from .report import write_report
from .runner import CellFailedError, StudyRunner, cell_key, read_record

DEFAULT_TRAIN_NET = Path(__file__).resolve().parents[2] / "tools" / "train_net.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m d2norm.study", description=__doc__, allow_abbrev=False)
    parser.add_argument("command", choices=("run", "report"),
                        help="run: train/evaluate unfinished cells, then report; report: aggregate finished cells")
    parser.add_argument("study_file", help="YAML study file (configs, seeds, variants)")
    parser.add_argument("--output", default="output/study", help="root directory of the cells (default %(default)s)")
    parser.add_argument("--results", help="where results.json, table.md and the plots go (default: --output)")
    parser.add_argument("--variants", nargs="+", help="only these variants (and what they evaluate)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    parser.add_argument("--num-gpus", type=int,
                        help="processes per cell (gloo on CPU without GPUs; default: the study file's workers, else 1)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each cell (1 is fastest on a busy CPU)")
    parser.add_argument("--poll-seconds", type=float, default=60.0, help="progress print interval")
    parser.add_argument("--train-net", default=str(DEFAULT_TRAIN_NET), help="path of tools/train_net.py")
    parser.epilog = ("Trailing KEY VALUE pairs override every cell's config, e.g. "
                     "DATASETS.TRAIN '(\"coco_2017_train\",)' DATASETS.TEST '(\"coco_2017_val\",)'")
    args, opts = parser.parse_known_args(argv)
    unknown = [o for o in opts if o.startswith("--")]
    if unknown or len(opts) % 2:
        parser.error(f"unrecognized arguments {unknown}" if unknown else f"overrides come in KEY VALUE pairs: {opts}")
    args.opts = opts
    return args


def known_records(results_file):
    """``{cell_key: record}`` of an existing ``results.json`` ({} if there is none): finished cells
    of a committed study count as finished on another machine."""
    if not results_file.exists():
        return {}
    return {cell_key(r["config"], r["variant"], r["seed"]): r for r in json.loads(results_file.read_text())}


def main(argv=None):
    args = parse_args(argv)
    try:
        cells = load_study(args.study_file, args.variants, args.seeds)
        study = read_study(args.study_file)
        every_cell = study.cells
    except StudyFileError as e:
        sys.exit(f"error: {e}")
    results_dir = Path(args.results or args.output)
    known = known_records(results_dir / "results.json")
    runner = StudyRunner(Path(args.output), Path(args.train_net), args.num_gpus, args.threads,
                         args.poll_seconds, tuple(args.opts))
    if args.command == "run":
        try:
            runner.run(cells, log=lambda line: print(line, flush=True), known=known)
        except CellFailedError as e:
            sys.exit(f"error: {e}")
    known.update(known_records(results_dir / "results.json"))  # written meanwhile by a parallel run
    records = [r for r in (read_record(c, args.output, known) for c in every_cell) if r is not None]
    print(f"[study] {len(records)}/{len(every_cell)} cells finished")
    if not records:
        return
    by_key = {cell_key(c.config, c.variant.name, c.seed): c for c in every_cell}
    table = write_report(records, results_dir,
                         lambda r: by_key[cell_key(r["config"], r["variant"], r["seed"])].directory(args.output),
                         gap=study.gap)
    print(table)


if __name__ == "__main__":
    main()
