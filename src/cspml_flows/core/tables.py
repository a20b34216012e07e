"""The one Markdown table writer: campaign reports and benchmark results write their tables through it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Separator cell of each alignment letter: left, right, centred.
ALIGNMENTS = {"l": "---", "r": "---:", "c": ":---:"}


def table_row(cells: Sequence[object]) -> str:
    """One Markdown table line: ``| a | b |`` (cells converted with ``str``, written as given).

    Parameters
    ----------
    cells
        The cells of the line, already formatted (numbers are written with ``str``).

    Returns
    -------
    str
        The line, without a newline.
    """
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table: header line, alignment line, one line per row.

    Parameters
    ----------
    header
        Column titles.
    rows
        The cells of each row, as many as there are columns, already formatted.
    align
        One letter per column: ``l`` (left), ``r`` (right) or ``c`` (centred); default all left.

    Returns
    -------
    str
        The table's lines joined by newlines, without a trailing newline.

    Raises
    ------
    ValueError
        When ``align`` or a row does not have one entry per column, or ``align`` holds another letter.
    """
    n = len(header)
    align = align if align is not None else "l" * n
    if len(align) != n or any(a not in ALIGNMENTS for a in align):
        raise ValueError(f"align {align!r}: one of {''.join(ALIGNMENTS)} per column ({n} columns)")
    lines = [table_row(header), "|" + "".join(ALIGNMENTS[a] + "|" for a in align)]
    for row in rows:
        if len(row) != n:
            raise ValueError(f"a row of {len(row)} cells in a table of {n} columns: {row!r}")
        lines.append(table_row(row))
    return "\n".join(lines)
