"""Writing filled tables as Markdown (printed), CSV (long format, one number per line) and LaTeX."""

from __future__ import annotations

import csv
import io
import re
from typing import Iterable

from emca.analysis.tables import Table

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "–": "--", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "Δ": r"$\Delta$", "±": r"$\pm$", "°": r"$^\circ$"}

_POWER = re.compile(r"(\d+\^\d+)")  # the captured group keeps the powers in re.split's result


def markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(table.header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    lines += [""] + [f"_{note}_" for note in table.notes]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Text for LaTeX: special characters escaped, powers such as the units' 2^20 typeset as math."""
    out = []
    for index, part in enumerate(_POWER.split(text)):
        if index % 2:  # a power: 2^20 -> $2^{20}$
            base, exponent = part.split("^")
            out.append(f"${base}^{{{exponent}}}$")
        else:
            out.append("".join(_LATEX_SPECIAL.get(char, char) for char in part))
    return "".join(out)


def latex(table: Table) -> str:
    """A booktabs table. LaTeX numbers the caption, so the caption leaves out the paper's number
    (the comment line keeps it); the label tab:<name> lets the text refer to the table."""
    columns = "ll" + "r" * (len(table.header) - 2)
    lines = [
        f"% {table.title}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(table.caption)}}}",
        rf"\label{{tab:{table.name}}}",
        rf"\begin{{tabular}}{{{columns}}}",
        r"\toprule",
        " & ".join(latex_escape(cell) for cell in table.header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {latex_escape(note)}" for note in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def csv_text(tables: Iterable[Table]) -> str:
    """Every record of the tables, one per line; the columns are the union of the record keys."""
    records = [record for table in tables for record in table.records]
    columns = list(dict.fromkeys(key for record in records for key in record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({key: "" if record.get(key) is None else record[key] for key in columns})
    return buffer.getvalue()
