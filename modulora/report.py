"""Tables for people: one Markdown-compatible layout, aligned for the terminal too."""

from __future__ import annotations

import os
from pathlib import Path


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table whose columns are padded to line up in a terminal."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("\n", " ").replace("|", "/")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
