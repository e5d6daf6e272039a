"""Tables: rows of dicts to CSV and Markdown, written atomically."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from pipeline.imageio import write_bytes_atomic


def _cell(value: Any, digits: int = 4, missing: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue().encode())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def markdown(rows: list[dict[str, Any]], columns: list[str], digits: int = 2) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(_cell(row.get(c), digits, "—") for c in columns) + " |" for row in rows
    ]
    return "\n".join(lines) + "\n"
