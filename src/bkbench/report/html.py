"""A tiny document model rendered to Markdown and to one self-contained HTML page.

The report's sections append blocks (headings, paragraphs, bullets, tables, images,
preformatted text) to a :class:`Doc`; the Markdown and the HTML then hold the same content.
A table cell may hold several lines (``\\n``): Markdown joins them with ``<br>``, HTML with
``<br>`` too, so nothing of a cell is cut.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any

VERDICT_CLASSES = {"PASS": "pass", "FAIL": "fail", "UNTESTABLE": "untestable"}

STYLE = (
    "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;"
    "margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em;max-width:100%}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;"
    "overflow-wrap:anywhere}"
    "th{background:#f0f0f0}img{max-width:100%}"
    ".banner{background:#fff3cd;border:2px solid #d39e00;padding:0.8em 1em;"
    "font-size:1.1em;margin:1em 0}"
    "td.pass{background:#d4edda;font-weight:bold}td.fail{background:#f8d7da;"
    "font-weight:bold}td.untestable{background:#e2e3e5;font-weight:bold}"
    "pre{background:#f6f8fa;padding:0.8em;overflow-x:auto}code{background:#f6f8fa}")


class Doc:
    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def banner(self, text: str) -> None:
        self.blocks.append(("banner", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", [str(h) for h in headers],
                            [[str(c) for c in r] for r in rows]))

    def image(self, filename: str, alt: str) -> None:
        self.blocks.append(("img", filename, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    # -- Markdown
    def markdown(self) -> str:
        return "\n\n".join(_MARKDOWN[b[0]](*b[1:]) for b in self.blocks) + "\n"

    # -- HTML
    def html(self, images: dict[str, bytes], title: str) -> str:
        body = [_html_image(images, *b[1:]) if b[0] == "img" else _HTML[b[0]](*b[1:])
                for b in self.blocks]
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "<br>")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


_MARKDOWN = {
    "h": lambda level, text: "#" * level + " " + text,
    "p": lambda text: text,
    "banner": lambda text: "> **" + text + "**",
    "ul": lambda items: "\n".join(f"- {i}" for i in items),
    "table": _md_table,
    "img": lambda filename, alt: f"![{alt}]({filename})",
    "pre": lambda text: "```\n" + text + "\n```",
}


def inline(text: str) -> str:
    """Escaped HTML of a Markdown-ish line: **bold**, `code`, line breaks."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s.replace("\n", "<br>")


def _html_cell(c: str) -> str:
    cls = VERDICT_CLASSES.get(c.strip("*"), "")
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{inline(c)}</td>"


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{inline(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(images: dict[str, bytes], filename: str, alt: str) -> str:
    data = images.get(filename)
    if data is None:
        return f"<p><em>{html.escape(filename)} missing</em></p>"
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{src}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


_HTML = {
    "h": lambda level, text: f"<h{level}>{inline(text)}</h{level}>",
    "p": lambda text: f"<p>{inline(text)}</p>",
    "banner": lambda text: f'<div class="banner">{inline(text)}</div>',
    "ul": lambda items: "<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>",
    "table": _html_table,
    "pre": lambda text: f"<pre>{html.escape(text)}</pre>",
}
