"""Markdown table of a pytest-benchmark JSON file, for bench/RESULTS.md.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/results_table.py bench.json

One row per benchmark: its median, the items/s recorded in extra_info, and its time relative to the
fastest benchmark of its group (medians of the same run).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def rate(extra: dict) -> str:
    for unit in ("images_per_s", "rows_per_s"):
        if unit in extra:
            return f"{extra[unit]:,.0f} {unit.replace('_per_s', '')}/s"
    return ""


def seconds(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(report: dict) -> str:
    groups = defaultdict(list)
    for b in report["benchmarks"]:
        groups[b["group"]].append(b)
    lines = ["| group | benchmark | median | throughput | × fastest |", "|---|---|---|---|---|"]
    for group, items in groups.items():
        fastest = min(b["stats"]["median"] for b in items)
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            median = b["stats"]["median"]
            lines.append(f"| {group} | `{b['name']}` | {seconds(median)} | {rate(b['extra_info'])} | {median / fastest:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python bench/results_table.py BENCH.json")
    with open(argv[0]) as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main()
