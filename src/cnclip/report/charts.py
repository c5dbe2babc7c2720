"""Charts for the reports: matplotlib (Agg) drawn to SVG text that the page inlines.

Text stays text in the SVG (`svg.fonttype: none`): the browser draws it with its own fonts, so a
Chinese source name renders wherever the reader has a CJK font, no font is embedded or fetched,
and the numbers a chart shows are in the page's DOM. The figures take already-aggregated values
(counts per bin, points of a curve): the data is summarised by polars before it gets here.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "cnclip",  # stable ids: the same report twice is the same file
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.prop_cycle": matplotlib.cycler(color=["#3b6ea5", "#d9822b", "#3a9a5b", "#b34747", "#7d5ba6", "#8c8c8c"]),
}
_COLOURS = _STYLE["axes.prop_cycle"].by_key()["color"]


def _svg(fig) -> str:
    """The figure as an inline <svg> element (no XML prologue, no doctype), then closed."""
    buffer = io.StringIO()
    with warnings.catch_warnings():  # glyphs the layout font lacks: the browser draws the text, not matplotlib
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = re.sub(r"^.*?(?=<svg)", "", buffer.getvalue(), count=1, flags=re.S)
    return _own_ids(text)


def _own_ids(svg: str) -> str:
    """Prefix the figure's ids (clip paths, glyphs, markers) and the references to them with a
    digest of the figure: many SVGs inline in one page share one id space, and matplotlib names
    ids after what they draw, so two figures could otherwise define the same id differently."""
    prefix = "f" + hashlib.sha1(svg.encode()).hexdigest()[:8] + "-"
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
    return re.sub(r'(href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}{prefix}{m.group(2)}", svg)


def _figure(width: float = 6.4, height: float = 3.0):
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax


def horizontal_bars(labels: Sequence[str], values: Sequence[float], title: str,
                    colours: Sequence[str] | None = None) -> str:
    """One bar per label, largest first as given, each with its number written beside it."""
    with plt.rc_context(_STYLE):
        fig, ax = _figure(6.4, 0.5 + 0.28 * max(len(labels), 1))
        positions = range(len(labels))
        ax.barh(list(positions), list(values), color=list(colours) if colours else _COLOURS[0])
        ax.set_yticks(list(positions), list(labels))
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        top = max(values, default=0) or 1
        for y, value in zip(positions, values, strict=True):
            ax.text(value + top * 0.01, y, f"{value:,}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.15)
        ax.set_title(title, loc="left")
        return _svg(fig)


def histogram(edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str) -> str:
    """Counts per bin (len(edges) == len(counts) + 1), as aggregated elsewhere."""
    with plt.rc_context(_STYLE):
        fig, ax = _figure(4.2, 2.6)
        ax.stairs(list(counts), list(edges), fill=True, color=_COLOURS[0], alpha=0.85)
        if len(counts) == 1:  # one value: show it as a bar among its neighbours, not a wall
            middle = (edges[0] + edges[1]) / 2
            ax.set_xlim(middle - max(abs(middle) * 0.1, 2.0), middle + max(abs(middle) * 0.1, 2.0))
        ax.set_title(title, loc="left")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        return _svg(fig)


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, ylabel: str,
           marks: Sequence[tuple[float, str]] = (), log_y: bool = False, xlabel: str = "samples seen") -> str:
    """Lines over one x-axis (name -> (xs, ys)), with vertical marks (x, label) such as a stage switch."""
    with plt.rc_context(_STYLE):
        fig, ax = _figure(6.4, 2.8)
        for index, (name, (xs, ys)) in enumerate(series.items()):
            ax.plot(list(xs), list(ys), label=name, color=_COLOURS[index % len(_COLOURS)],
                    marker="o" if len(xs) <= 12 else None, markersize=3, linewidth=1.4)
        for x, label in marks:
            ax.axvline(x, color="#555", linestyle="--", linewidth=1)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                        textcoords="offset points", fontsize=8, color="#555")
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, loc="left")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(series) > 1:
            ax.legend(fontsize=8, frameon=False)
        return _svg(fig)
