"""Merge detection-quality logs (runs.jsonl of several runs) into one mean ± std table.

    python -m benchmarks.summarise runs/q*/runs.jsonl

Keeps the final cycle of each (dataset, centre crop, method, seed); a seed logged twice
counts once (the later line wins). Logs written before the centre crop existed count as crop 1.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.detection_quality import table_header, table_row


def final_rows(paths: list[Path]) -> dict[tuple[str, float, str], list[dict]]:
    """(dataset, centre crop, method) -> the last-cycle row of every seed."""
    last: dict[tuple[str, float, str, int], dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["dataset"], row.get("center_crop", 1.0), row["method"], row["seed"])
            if key not in last or row["cycle"] >= last[key]["cycle"]:
                last[key] = row
    groups: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for (dataset, crop, method, _), row in sorted(last.items()):
        groups[(dataset, crop, method)].append(row)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", type=Path, nargs="+", help="runs.jsonl files")
    args = parser.parse_args()
    print("\n".join(table_header(["dataset", "crop", "method"])))
    for (dataset, crop, method), rows in final_rows(args.logs).items():
        print(table_row([dataset, f"{crop:g}", method], rows))


if __name__ == "__main__":
    main()
