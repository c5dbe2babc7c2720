"""The one page both reports share: a self-contained HTML file (inline CSS, inline SVG charts,
images as data: URIs) that opens offline, with no script, font or stylesheet from anywhere.

A report is a title, a subtitle and a list of sections; each section is built from the helpers
here (tables, a figure row, an image grid), which escape every value they are given.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from cnclip._common.atomic import write_text_atomic

_CSS = """
:root { --fg:#1d2430; --muted:#5b6472; --line:#dde2e8; --bg:#f6f7f9; --accent:#3b6ea5; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", "PingFang SC",
       "Microsoft YaHei", sans-serif; color:var(--fg); background:var(--bg); }
header { padding:18px 28px; background:#fff; border-bottom:1px solid var(--line); }
header h1 { margin:0; font-size:20px; } header p { margin:4px 0 0; color:var(--muted); }
nav { padding:6px 28px; background:#fff; border-bottom:1px solid var(--line); font-size:13px; }
nav a { margin-right:14px; color:var(--accent); text-decoration:none; }
main { padding:8px 28px 40px; max-width:1400px; }
section { background:#fff; border:1px solid var(--line); border-radius:6px; margin:16px 0; padding:12px 18px; }
section h2 { font-size:16px; margin:4px 0 10px; } h3 { font-size:14px; margin:14px 0 6px; }
.note { color:var(--muted); font-size:13px; }
table { border-collapse:collapse; margin:6px 0; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:3px 10px 3px 0; text-align:left; vertical-align:top; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; padding-left:12px; }
.figures { display:flex; flex-wrap:wrap; gap:12px; } .figures figure { margin:0; }
.figures svg { max-width:100%; height:auto; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(150px, 1fr)); gap:10px; }
.tile { border:1px solid var(--line); border-radius:4px; padding:6px; font-size:12px; }
.tile img { width:100%; height:140px; object-fit:contain; background:#eee; display:block; }
.tile .key { color:var(--muted); font-family:ui-monospace, monospace; }
.pair { display:flex; gap:6px; max-width:420px; } .pair > div { flex:1; } .gone { height:140px; display:flex;
        align-items:center; justify-content:center; background:#eee; color:var(--muted); font-size:12px; }
.arrow { color:var(--muted); } code, pre { font-family:ui-monospace, monospace; font-size:12px; }
pre { background:var(--bg); padding:8px; overflow:auto; max-height:480px; border-radius:4px; }
.example { border-bottom:1px dashed var(--line); padding:4px 0; font-size:13px; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return esc(value)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (), attrs: str = "") -> str:
    """An HTML table; columns listed in `numeric` are right-aligned and formatted as numbers."""
    cls = lambda i: ' class="num"' if i in numeric else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{number(v) if i in numeric else esc(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figures(svgs: Iterable[str]) -> str:
    return '<div class="figures">' + "".join(f"<figure>{svg}</figure>" for svg in svgs) + "</div>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def settings_block(settings: Any) -> str:
    """A settings mapping as indented JSON (what the run or the build resolved)."""
    return f"<pre>{esc(json.dumps(settings, ensure_ascii=False, indent=2, default=str))}</pre>"


@dataclass
class Section:
    id: str
    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, *parts: str) -> "Section":
        self.parts.extend(parts)
        return self

    def html(self) -> str:
        return f'<section id="{esc(self.id)}"><h2>{esc(self.title)}</h2>{"".join(self.parts)}</section>'


def render(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    links = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"zh-CN\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<nav>{links}</nav><main>{''.join(s.html() for s in sections)}</main></body></html>\n")


def write_page(path: Path, title: str, subtitle: str, sections: Sequence[Section]) -> Path:
    """Write the page atomically (a reader never opens half a report); returns its path."""
    write_text_atomic(path, render(title, subtitle, sections))
    return Path(path)
