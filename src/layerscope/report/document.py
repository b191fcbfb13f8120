"""A report as plain data (sections of text, tables and figures), written as HTML or Markdown.

One document, two renderings, so the two files never disagree. The HTML file is self-contained:
the CSS is inline and every figure is a base64 PNG, so it opens offline, attaches to an e-mail
and runs no script. The Markdown file links the PNGs that sit in a folder beside it.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd


@dataclass
class Text:
    text: str


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class TableBlock:
    frame: pd.DataFrame
    caption: str = ""
    max_rows: int = 60


@dataclass
class Items:
    items: list[str]


@dataclass
class Gallery:
    """Figures side by side (two per row in HTML; one after another in Markdown)."""

    figures: list[Figure]


Block = Union[Text, Figure, TableBlock, Items, Gallery]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass
class Document:
    title: str
    subtitle: str
    sections: list[Section]


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits, integers whole, missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(value)


# -- HTML ------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans","Noto Sans","Noto Sans Thai","Noto Sans Sinhala","Noto Sans Tibetan","Noto Sans CJK SC",sans-serif;margin:0;color:#1d232b;background:#f6f7f9;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px;background:#fff;box-shadow:0 0 0 1px #e3e6ea}
h1{font-size:1.8rem;margin:0.2em 0 0}
.subtitle{color:#5b6470;margin:0.2em 0 1.2em}
h2{font-size:1.35rem;border-bottom:2px solid #e3e6ea;padding-bottom:4px;margin-top:2.2em}
h3{font-size:1.1rem;margin-top:1.6em}
nav{background:#f0f3f7;border-radius:6px;padding:10px 16px;margin:1em 0}
nav ol{margin:0;padding-left:1.4em;columns:2}
nav a{color:#2b5797;text-decoration:none}
figure{margin:1.2em 0;text-align:center}
figure img{max-width:100%;height:auto;border:1px solid #e3e6ea;border-radius:4px}
figcaption{color:#5b6470;font-size:0.9rem;margin-top:4px}
table{border-collapse:collapse;margin:0.8em 0 1.2em;font-size:0.86rem;display:block;overflow-x:auto;max-width:100%}
caption{text-align:left;font-weight:600;padding:4px 0;color:#36404a}
th,td{border:1px solid #e3e6ea;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f3f7;position:sticky;top:0}
td.text,th.text{text-align:left;white-space:normal;min-width:8em}
tr:nth-child(even) td{background:#fafbfc}
.note{color:#5b6470;font-size:0.9rem}
.gallery{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px;align-items:start}
.gallery figure{margin:0.4em 0}
"""


def _html_table(block: TableBlock) -> str:
    frame = block.frame.head(block.max_rows)
    text_cols = {c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c]) and not all(
        isinstance(v, (int, float, np.number)) or v is None for v in frame[c])}
    head = "".join(f'<th class="{"text" if c in text_cols else ""}">{html.escape(str(c))}</th>' for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = "".join(f'<td class="{"text" if c in text_cols else ""}">{html.escape(fmt(v))}</td>'
                        for c, v in zip(frame.columns, row))
        body.append(f"<tr>{cells}</tr>")
    more = f'<p class="note">… {len(block.frame) - block.max_rows} more rows in the CSV files.</p>' \
        if len(block.frame) > block.max_rows else ""
    caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, TableBlock):
        return _html_table(block)
    if isinstance(block, Gallery):
        return '<div class="gallery">' + "".join(_html_block(f) for f in block.figures) + "</div>"
    if isinstance(block, Figure):
        data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
        alt = html.escape(block.caption)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{alt}</figcaption></figure>")
    raise TypeError(type(block).__name__)


def to_html(doc: Document) -> str:
    nav = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in doc.sections if s.level == 2)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{html.escape(doc.title)}</h1><p class=\"subtitle\">{html.escape(doc.subtitle)}</p>",
             f"<nav><strong>Contents</strong><ol>{nav}</ol></nav>"]
    for s in doc.sections:
        parts.append(f'<h{s.level} id="{s.anchor}">{html.escape(s.title)}</h{s.level}>')
        parts.extend(_html_block(b) for b in s.blocks)
    parts.append("</main></body></html>")
    return "\n".join(parts)


# -- Markdown --------------------------------------------------------------------------------------
def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Items):
        return "\n".join(f"- {i}" for i in block.items)
    if isinstance(block, TableBlock):
        frame = block.frame.head(block.max_rows)
        lines = [f"**{block.caption}**", ""] if block.caption else []
        lines.append("| " + " | ".join(str(c) for c in frame.columns) + " |")
        lines.append("|" + "|".join("---" for _ in frame.columns) + "|")
        lines.extend("| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False))
        if len(block.frame) > block.max_rows:
            lines.append(f"\n… {len(block.frame) - block.max_rows} more rows in the CSV files.")
        return "\n".join(lines)
    if isinstance(block, Gallery):
        return "\n\n".join(_md_block(f, base) for f in block.figures)
    if isinstance(block, Figure):
        rel = Path(os.path.relpath(Path(block.path).resolve(), base.resolve())).as_posix()
        return f"![{block.caption}]({rel})\n\n*{block.caption}*"
    raise TypeError(type(block).__name__)


def to_markdown(doc: Document, base: Path) -> str:
    """Markdown whose image links are relative to ``base`` (the folder the .md file is written to)."""
    parts = [f"# {doc.title}", "", doc.subtitle, ""]
    parts += ["**Contents:** " + " · ".join(f"[{s.title}](#{s.anchor})" for s in doc.sections if s.level == 2), ""]
    for s in doc.sections:
        parts += ["#" * s.level + " " + s.title, ""]
        for b in s.blocks:
            parts += [_md_block(b, base), ""]
    return "\n".join(parts)
