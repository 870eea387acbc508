"""The region table of the Compose tab: rows ``[x0, y0, x1, y1, prompt]`` (fractions of the image, (0, 0) at
the top left), as the canvas draws them and as ``loraclr generate --region`` reads them.

The table is the one source of truth: the canvas adds rows by dragging and redraws from the rows; numbers
typed into the table redraw the canvas. Rows become ``--region "x0,y0,x1,y1:prompt"`` arguments unchanged,
so a bad row gets the command's own error.
"""

from __future__ import annotations

from typing import Any

COLUMNS = ["x0", "y0", "x1", "y1", "prompt"]
DIGITS = 3  # a drawn box snaps to 1/1000 of the image: finer than any latent grid
MIN_DRAWN = 0.02  # a drag smaller than this (a click) draws no box


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def clean_rows(rows: Any) -> list[list]:
    """Rows as lists of five cells, without rows left wholly empty (a table widget's blank line)."""
    out = []
    for row in rows or []:
        cells = list(row)[:5] + [""] * (5 - len(list(row)[:5]))
        if all(str(c).strip() in ("", "nan", "None") for c in cells):
            continue
        out.append(cells)
    return out


def region_arguments(rows: Any) -> list[str]:
    """``["--region", "x0,y0,x1,y1:prompt", ...]`` for the command line, the cells written as given."""
    args = []
    for cells in clean_rows(rows):
        box = ",".join(_cell(c) for c in cells[:4])
        args += ["--region", f"{box}:{str(cells[4]).strip()}"]
    return args


def _cell(v: Any) -> str:
    f = _number(v)
    if f is None:
        return str(v).strip()
    return f"{f:g}" if abs(f - round(f, 6)) < 1e-12 else repr(f)


def add_box(rows: Any, box: Any, prompt: str = "") -> list[list]:
    """The rows with a drawn box appended: corners in any order, clipped to the image, snapped to
    :data:`DIGITS`; a box thinner than :data:`MIN_DRAWN` (a click, not a drag) is ignored."""
    rows = clean_rows(rows)
    try:
        xa, ya, xb, yb = (min(max(float(v), 0.0), 1.0) for v in box)
    except (TypeError, ValueError):
        return rows
    x0, x1, y0, y1 = min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb)
    if x1 - x0 < MIN_DRAWN or y1 - y0 < MIN_DRAWN:
        return rows
    return rows + [[round(x0, DIGITS), round(y0, DIGITS), round(x1, DIGITS), round(y1, DIGITS), prompt]]


def insert_text(rows: Any, region: int, text: str) -> list[list]:
    """``text`` added to the prompt of region ``region`` (1-based), separated by a space."""
    rows = clean_rows(rows)
    if not 1 <= region <= len(rows):
        raise ValueError(f"region {region}: there are {len(rows)} regions; draw one first or pick another")
    old = str(rows[region - 1][4]).strip()
    rows[region - 1][4] = f"{old} {text}".strip()
    return rows


def canvas_boxes(rows: Any) -> list[dict]:
    """What the canvas draws: per row with four numbers, its position in percent and a label; rows that are not
    boxes yet (a number missing) are left out (the command reports them when generating)."""
    out = []
    for i, cells in enumerate(clean_rows(rows), 1):
        nums = [_number(c) for c in cells[:4]]
        if any(n is None for n in nums):
            continue
        x0, y0, x1, y1 = (min(max(n, 0.0), 1.0) for n in nums)  # type: ignore[arg-type]
        prompt = str(cells[4]).strip()
        out.append({"n": i, "left": round(100 * min(x0, x1), 2), "top": round(100 * min(y0, y1), 2),
                    "width": round(100 * abs(x1 - x0), 2), "height": round(100 * abs(y1 - y0), 2),
                    "label": f"{i}: {prompt[:40]}" if prompt else str(i)})
    return out
