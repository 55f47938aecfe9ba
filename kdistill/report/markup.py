"""HTML building blocks of the report: escaping, sections, tables whose numeric cells name their source.

A cell made by `num` carries ``data-src`` (the path of the value in ``summary.json``, ``/``-separated, list
indices as numbers) and ``data-value`` (the exact value), so a test can check every number on the page against
the run's summary.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["Cell", "Section", "esc", "fmt_count", "lookup", "nodata", "num", "table"]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Cell:
    """A table cell: shown text, and for a number from the summary its source path and exact value."""

    text: str
    src: Optional[str] = None
    value: Any = None
    klass: str = "num"

    def html(self) -> str:
        attrs = f' class="{self.klass}"' if self.klass else ""
        if self.src is not None:
            attrs += f' data-src="{esc(self.src)}" data-value="{esc(json.dumps(self.value))}"'
        return f"<td{attrs}>{esc(self.text)}</td>"


def lookup(summary: Any, src: str) -> Any:
    """The value at ``/``-separated path `src` in `summary` (list indices as numbers)."""
    value = summary
    for part in src.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def fmt_count(n: Optional[float]) -> str:
    """1234567 -> 1.23M (k, M, G), '-' for None."""
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def num(summary: dict, src: str, fmt: str = ".4g", *, scale: float = 1.0, count: bool = False) -> Cell:
    """A cell of the summary's number at `src` (formatted with `fmt` after multiplying by `scale`, or as a count);
    '-' when the path is absent or the value is None."""
    try:
        value = lookup(summary, src)
    except (KeyError, IndexError, TypeError, ValueError):
        return Cell("-")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return Cell("-")
    if isinstance(value, float) and not math.isfinite(value):
        return Cell(str(value), src, None)
    text = fmt_count(value) if count else format(value * scale, fmt)
    return Cell(text, src, value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str = "", klass: str = "") -> str:
    """A table in a horizontally scrolling box; a row's first cell is its label (a string or a `Cell`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if isinstance(cell, Cell):
                cells.append(cell.html())
            else:
                cells.append(f'<td{"" if i == 0 else " class=num"}>{esc(cell)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table class="{esc(klass)}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def nodata(text: str) -> str:
    """The plain sentence a section shows when this run has no data for it."""
    return f'<p class="nodata">{esc(text)}</p>'


@dataclass
class Section:
    """One section of the page: anchor id, heading, body HTML, and whether it had data."""

    id: str
    title: str
    body: str
    has_data: bool = True

    def html(self) -> str:
        return (f'<section id="{esc(self.id)}" data-has-data="{str(self.has_data).lower()}">'
                f"<h2>{esc(self.title)}</h2>{self.body}</section>")
