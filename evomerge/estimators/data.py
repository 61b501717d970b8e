"""Response matrices and full scores, read from CSV in the metabench layout.

A response file has one row per subject (an LLM): the first column names it
(`llm`, `Model`, or an unnamed column) and every other column is an item. Cells
are 0/1 or graded scores in [0, 1]; empty / NA cells are missing. A scores file
has a name column (`llm` or the first column) and a score column (`score` by
default), in accuracy units or percent. Every problem is reported as one line
naming the file, row and column.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError

MISSING = {"", "na", "nan", "null", "none"}


@dataclass
class ResponseMatrix:
    subjects: list[str]
    items: list[str]
    values: np.ndarray  # subjects x items, float, nan = missing

    @property
    def graded(self) -> bool:
        observed = self.values[~np.isnan(self.values)]
        return bool(np.any((observed != 0) & (observed != 1)))


def _open_text(path: Path):
    if not path.exists():
        raise EvomergeError(f"{path}: no such file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise EvomergeError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        return io.StringIO(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise EvomergeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        rows = list(csv.reader(_open_text(path)))
    except csv.Error as exc:
        raise EvomergeError(f"{path}: malformed CSV ({exc})") from None
    rows = [r for r in rows if r]  # blank lines carry nothing
    if not rows:
        raise EvomergeError(f"{path}: empty file")
    return rows[0], rows[1:]


def _number(text: str, path: Path, line: int, column: str) -> float:
    text = text.strip()
    if text.lower() in MISSING:
        return np.nan
    try:
        value = float(text)
    except ValueError:
        raise EvomergeError(f"{path}: row {line}, column {column!r}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise EvomergeError(f"{path}: row {line}, column {column!r}: {text!r} is not finite")
    return value


def _fast_values(rows: list[list[str]]) -> np.ndarray | None:
    """All cells at once (each distinct cell text converted once); None when any cell is bad,
    so that the slow path can name it."""
    seen: dict[str, float] = {}

    def convert(text: str) -> float:
        t = text.strip().lower()
        if t in MISSING:
            return np.nan
        v = float(t)
        if not (0.0 <= v <= 1.0):  # also false for nan / inf spelled differently
            raise ValueError(text)
        return v

    try:
        flat = []
        for row in rows:
            for cell in row[1:]:
                v = seen.get(cell)
                if v is None:
                    v = seen[cell] = convert(cell)
                flat.append(v)
    except ValueError:
        return None
    return np.array(flat, dtype=float).reshape(len(rows), len(rows[0]) - 1)


def load_responses(path: str | Path) -> ResponseMatrix:
    """Read a subjects x items response CSV (optionally .gz), validating every cell."""
    path = Path(path)
    header, rows = _rows(path)
    if len(header) < 2:
        raise EvomergeError(f"{path}: needs a subject column and at least one item column")
    items = [h.strip() for h in header[1:]]
    if len(set(items)) != len(items):
        dup = next(i for i in items if items.count(i) > 1)
        raise EvomergeError(f"{path}: item column {dup!r} appears twice")
    if not rows:
        raise EvomergeError(f"{path}: no subject rows")
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise EvomergeError(f"{path}: row {r + 2} has {len(row)} cells, the header has {len(header)}")
    subjects = [row[0].strip() for row in rows]
    values = _fast_values(rows)
    if values is not None:
        return ResponseMatrix(subjects, items, values)
    # Something is wrong somewhere: walk the cells to name the first bad one.
    values = np.empty((len(rows), len(items)))
    for r, row in enumerate(rows):
        line = r + 2  # 1-based, after the header
        for c, cell in enumerate(row[1:]):
            v = _number(cell, path, line, items[c])
            if not np.isnan(v) and not 0.0 <= v <= 1.0:
                raise EvomergeError(f"{path}: row {line}, column {items[c]!r}: {v} is outside [0, 1]")
            values[r, c] = v
    return ResponseMatrix(subjects, items, values)


def load_scores(path: str | Path, subjects: list[str], column: str = "score") -> np.ndarray:
    """Full scores (0-1) of `subjects`, in their order, from a scores CSV."""
    path = Path(path)
    header, rows = _rows(path)
    header = [h.strip() for h in header]
    name_col = header.index("llm") if "llm" in header else 0
    if column not in header:
        raise EvomergeError(f"{path}: no column {column!r} (columns: {', '.join(h or '<unnamed>' for h in header)})")
    score_col = header.index(column)
    by_name: dict[str, float] = {}
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise EvomergeError(f"{path}: row {r + 2} has {len(row)} cells, the header has {len(header)}")
        by_name[row[name_col].strip()] = _number(row[score_col], path, r + 2, column)
    missing = [s for s in subjects if s not in by_name or np.isnan(by_name[s])]
    if missing:
        raise EvomergeError(f"{path}: no {column!r} for subject {missing[0]!r} ({len(missing)} subjects lack one)")
    scores = np.array([by_name[s] for s in subjects])
    if scores.max() > 1.0:  # percent, as metabench and AlpacaEval store them
        scores = scores / 100.0
    if scores.min() < 0.0 or scores.max() > 1.0:
        raise EvomergeError(f"{path}: column {column!r} has values outside 0-1 and 0-100")
    return scores
