"""Matplotlib for writing figure files: the Agg backend (no display) and one way to save."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(figure, path: Path, title: str | None = None, also: tuple[str, ...] = ()) -> Path:
    """Title, lay out, write (creating the folder) and close, so figures never pile up in memory; `also`:
    suffixes of other formats written beside `path` (".pdf")."""
    if title:
        # Run descriptions are long; wrap them to the figure's width instead of clipping.
        width_chars = int(figure.get_figwidth() * 11)
        figure.suptitle(textwrap.fill(title, width_chars), fontsize="medium")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (path.suffix, *also):
        figure.savefig(path.with_suffix(suffix), dpi=120)
    plt.close(figure)
    return path


__all__ = ["plt", "save_figure"]
