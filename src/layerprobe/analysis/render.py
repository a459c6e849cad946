"""Render the report document as self-contained HTML (base64 images) and as Markdown.

Both are built from the same list of blocks (headings, paragraphs, notes, figures,
tables) so the two stay in step.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import pandas as pd

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:1.7em;margin:0 0 .2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin:1.6em 0 .4em;font-size:1.05em}
.meta{color:#555;font-size:.92em;line-height:1.5}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:12px 0;font-size:.92em}
.note ul{margin:.3em 0 .2em 1.2em;padding:0}
figure{margin:12px 0 28px} figure img{display:block;height:auto;max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:6px;max-width:900px;line-height:1.45}
table{border-collapse:collapse;font-size:.82em;margin:8px 0 4px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f1f3f5;position:sticky;top:0;white-space:normal;vertical-align:bottom;max-width:7.5em;font-weight:600}
tbody tr:nth-child(even){background:#fafbfc}
.scroll{max-width:100%;overflow-x:auto;max-height:640px;overflow-y:auto}
nav{font-size:.9em;margin:14px 0} nav a{margin-right:14px}
pre{background:#f6f8fa;padding:10px;font-size:.82em;overflow-x:auto}
"""


@dataclass
class Heading:
    text: str
    level: int = 2

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.text.lower()).strip("-")


@dataclass
class Paragraph:
    text: str


@dataclass
class Note:
    title: str
    items: list[str]


@dataclass
class FigureBlock:
    key: str
    title: str
    caption: str
    png: Path  # embedded in the HTML, linked from the Markdown
    width_in: float
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class TableBlock:
    title: str
    caption: str
    frame: pd.DataFrame
    csv_name: str | None = None


@dataclass
class Preformatted:
    text: str


Block = Union[Heading, Paragraph, Note, FigureBlock, TableBlock, Preformatted]
COUNT_COLUMNS = ("n_tasks", "n_seen", "num_classes", "n_train", "n_val", "n_test", "n")


def format_cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if ("layer" in column or column in COUNT_COLUMNS) and value.is_integer():
            return str(int(value))
        digits = 1 if "layer" in column else 3
        return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"
    return str(value)


def _numeric(frame: pd.DataFrame) -> list[bool]:
    """Which columns hold numbers (right-aligned)."""
    return [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in frame.columns]


def _rows(frame: pd.DataFrame) -> list[list[str]]:
    return [[format_cell(c, v) for c, v in zip(frame.columns, row)] for row in frame.itertuples(index=False)]


# ---------------------------------------------------------------------------- HTML


def _html_block(block: Block, base: Path) -> str:
    if isinstance(block, Heading):
        return f'<h{block.level} id="{block.anchor}">{html.escape(block.text)}</h{block.level}>'
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Note):
        items = "".join(f"<li>{html.escape(i)}</li>" for i in block.items)
        return f'<div class="note"><strong>{html.escape(block.title)}</strong><ul>{items}</ul></div>'
    if isinstance(block, Preformatted):
        return f"<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, FigureBlock):
        data = base64.b64encode(block.png.read_bytes()).decode("ascii")
        rel = html.escape(_relative(block.png, base))
        width = round(block.width_in * 96)  # CSS px at the figure's physical size: fonts read at their point size
        return (
            f'<figure id="{block.key}"><a href="{rel}" title="open the full-size figure (figures/ next to this report)">'
            f'<img alt="{html.escape(block.title)}" style="width:{width}px" src="data:image/png;base64,{data}"></a>'
            f"<figcaption><strong>{html.escape(block.title)}.</strong> {html.escape(block.caption)}</figcaption></figure>"
        )
    head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in block.frame.columns)
    numeric = _numeric(block.frame)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if num else ''}>{html.escape(v)}</td>" for v, num in zip(row, numeric)) + "</tr>"
        for row in _rows(block.frame)
    )
    source = f" Also in <code>{html.escape(block.csv_name)}</code>." if block.csv_name else ""
    return (
        f"<h3>{html.escape(block.title)}</h3><p class=\"meta\">{html.escape(block.caption)}{source}</p>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def to_html(title: str, meta: list[str], blocks: list[Block], base: Path) -> str:
    nav = " ".join(f'<a href="#{b.anchor}">{html.escape(b.text)}</a>' for b in blocks if isinstance(b, Heading) and b.level == 2)
    body = "\n".join(_html_block(b, base) for b in blocks)
    meta_html = "<br>".join(html.escape(m) for m in meta)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><main><h1>{html.escape(title)}</h1><p class=\"meta\">{meta_html}</p>"
        f"<nav>{nav}</nav>\n{body}\n</main></body></html>\n"
    )


# ---------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(_md_escape(str(c)) for c in frame.columns) + " |"
    rule = "|" + "|".join("---:" if num else ":---" for num in _numeric(frame)) + "|"
    rows = ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in _rows(frame)]
    return "\n".join([head, rule, *rows])


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Note):
        return f"> **{block.title}**\n" + "\n".join(f"> - {i}" for i in block.items)
    if isinstance(block, Preformatted):
        return f"```\n{block.text}\n```"
    if isinstance(block, FigureBlock):
        return f"![{block.title}]({_relative(block.png, base)})\n\n*{block.title}.* {block.caption}"
    source = f" Also in `{block.csv_name}`." if block.csv_name else ""
    return f"### {block.title}\n\n{block.caption}{source}\n\n{md_table(block.frame)}"


def to_markdown(title: str, meta: list[str], blocks: list[Block], base: Path) -> str:
    parts = [f"# {title}", "  \n".join(meta)] + [_md_block(b, base) for b in blocks]
    return "\n\n".join(parts) + "\n"


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()
