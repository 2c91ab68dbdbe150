"""Plain-text tables for logs and command-line output (reports, alignment pairing, benchmarks, ablations)."""
from __future__ import annotations

from typing import Any

__all__ = ['format_table']


def format_table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """Plain-text table; ``align`` is one ``l``/``r`` per column (default: numbers right)."""
    cells = [[str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = ''.join('r' if rows and isinstance(rows[0][i], (int, float)) else 'l' for i in range(len(headers)))

    def line(values: list[str]) -> str:
        return '  '.join(v.rjust(w) if a == 'r' else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return '\n'.join([line(headers), line(['-' * w for w in widths])] + [line(r) for r in cells])
