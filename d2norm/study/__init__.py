"""Small-batch studies: a *config x variant x seed* matrix trained with ``tools/train_net.py``.

``python -m d2norm.study run STUDY.yaml`` trains every unfinished cell (resumable, with progress and
ETA) and writes ``results.json``, a markdown table and PNG plots; ``report`` only re-aggregates.
The same command drives the paper configs on a GPU cluster (``--num-gpus 8``, COCO datasets).
"""
from .matrix import Cell, StudyFileError, Variant, load_study
from .report import aggregate, markdown_table, write_report
from .runner import CellFailedError, StudyRunner, read_record

__all__ = ["Cell", "CellFailedError", "StudyFileError", "StudyRunner", "Variant", "aggregate", "load_study",
           "markdown_table", "read_record", "write_report"]
