"""Small-batch studies: a *config x variant x seed* matrix trained with ``tools/train_net.py``.

``python -m d2norm.study run STUDY.yaml`` trains every unfinished cell (resumable, with progress and
ETA) and writes ``results.json``, a markdown table and PNG plots; ``report`` only re-aggregates.
The same command drives the paper configs on a GPU cluster (``--num-gpus 8``, COCO datasets).
"""
from .matrix import Cell, StudyFileError, Variant, load_study, read_study
from .report import Gate, aggregate, gap_fractions, markdown_table, write_report
from .runner import CellFailedError, StudyRunner, read_record

__all__ = ["Cell", "CellFailedError", "Gate", "StudyFileError", "StudyRunner", "Variant", "aggregate",
           "gap_fractions", "load_study", "markdown_table", "read_record", "read_study", "write_report"]
