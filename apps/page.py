"""A page as data (sections of text, tables, images, folded details), written twice: one HTML file
that carries its images inside it (mail it, attach it to a ticket, open it offline) and Markdown for a
pull request, whose images are the PNG files beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    headers: list[str]
    rows: list[list]
    caption: str = ""


@dataclass
class Figure:
    path: Path  # a PNG in the page's folder
    caption: str = ""


@dataclass
class Details:
    summary: str
    text: str  # shown as preformatted text


@dataclass
class Section:
    title: str
    items: list = field(default_factory=list)  # str (a paragraph) | Table | Figure | Details


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _td(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='n'>{html.escape(_cell(value))}</td>" if numeric else f"<td>{html.escape(_cell(value))}</td>"


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}caption{text-align:left;color:#555;padding:.2em 0}
img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.85em}
summary{cursor:pointer;color:#335}
"""


def to_html(title: str, intro: list[str], sections: list[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(p)}</p>" for p in intro]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for item in section.items:
            if isinstance(item, str):
                parts.append(f"<p>{html.escape(item)}</p>")
            elif isinstance(item, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in item.headers)
                body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in item.rows)
                caption = f"<caption>{html.escape(item.caption)}</caption>" if item.caption else ""
                parts.append(f"<table>{caption}<tr>{head}</tr>{body}</table>")
            elif isinstance(item, Figure):
                data = base64.b64encode(Path(item.path).read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(item.caption)}'>"
                             f"<figcaption>{html.escape(item.caption)}</figcaption></figure>")
            elif isinstance(item, Details):
                parts.append(f"<details><summary>{html.escape(item.summary)}</summary>"
                             f"<pre>{html.escape(item.text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_cell(value) -> str:
    return _cell(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, intro: list[str], sections: list[Section]) -> str:
    lines = [f"# {title}", ""] + [line for p in intro for line in (p, "")]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for item in section.items:
            if isinstance(item, str):
                lines += [item, ""]
            elif isinstance(item, Table):
                if item.caption:
                    lines += [item.caption, ""]
                lines.append("| " + " | ".join(item.headers) + " |")
                lines.append("|" + " --- |" * len(item.headers))
                lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in item.rows]
                lines.append("")
            elif isinstance(item, Figure):
                lines += [f"![{item.caption}]({Path(item.path).name})", "", f"*{item.caption}*", ""]
            elif isinstance(item, Details):
                lines += ["<details>", f"<summary>{item.summary}</summary>", "", "```", item.text, "```", "", "</details>", ""]
    return "\n".join(lines)


def write_page(folder: Path, stem: str, title: str, intro: list[str], sections: list[Section]) -> tuple[Path, Path]:
    """`<stem>.html` (self-contained) and `<stem>.md` in `folder`, where the figures' PNGs already are."""
    folder.mkdir(parents=True, exist_ok=True)
    html_path, md_path = folder / f"{stem}.html", folder / f"{stem}.md"
    html_path.write_text(to_html(title, intro, sections))
    md_path.write_text(to_markdown(title, intro, sections))
    return html_path, md_path
