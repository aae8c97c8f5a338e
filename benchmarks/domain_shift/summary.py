#!/usr/bin/env python3
"""The domain-shift table from the study's results.json: per trained variant, box / mask AP (mean ±
sample sd over seeds, the seeds in brackets) on the source domain, on the shifted domain with the
source statistics, and there after label-free recalibration.

    python benchmarks/domain_shift/summary.py benchmarks/domain_shift/results.json
"""
import json
import statistics
import sys
from collections import defaultdict

COLUMNS = (("@val500", "source"), ("@shifted", "shifted"), ("@shifted+recalibrated", "shifted, recalibrated"))


def cell(records, task):
    values = [r[f"{task}_ap"] for r in sorted(records, key=lambda r: r["seed"])]
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f} ({len(values)})"


def table(records):
    by_variant = defaultdict(lambda: defaultdict(list))
    for r in records:
        for suffix, column in COLUMNS:
            if r["variant"].endswith(suffix):
                by_variant[r["variant"][: -len(suffix)]][column].append(r)
    lines = ["| variant | " + " | ".join(f"{c}: box AP | {c}: mask AP" for _, c in COLUMNS) + " |",
             "|---|" + "---:|" * (2 * len(COLUMNS))]
    for variant, columns in by_variant.items():
        cells = [cell(columns[c], task) for _, c in COLUMNS for task in ("box", "mask")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(open(sys.argv[1]).read())))
