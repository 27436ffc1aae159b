"""The renderer: a report built as a list of blocks, written as Markdown and as self-contained HTML.

A block is a tuple: ``("h1" | "h2" | "h3", text)``, ``("p", text)``, ``("ul", [items])``,
``("table", head, rows)`` or ``("img", file name, alt text)``. The same blocks render twice, so
the Markdown and the HTML always say the same thing. The HTML embeds the images as base64 PNGs
and links nothing: it opens offline, attached to an email, years later. Text may use `code`,
**bold** and *italic*. `cai eval`'s report, `cai agreement` and `cai calibrate` render through it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif kind == "table":
            head, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def _inline_html(s: str) -> str:
    """Escape, then the two bits of Markdown the blocks use: `code` and **bold** / *italic*."""
    import re

    s = html.escape(str(s))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return re.sub(r"\*([^*]+)\*", r"<i>\1</i>", s)


_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
img{max-width:100%;display:block;margin:.5em 0 1.5em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def render_html(blocks: list[tuple], img_dir: Path) -> str:
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cai report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head, rows = b[1], b[2]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_inline_html(h)}</th>" for h in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
        elif kind == "img":
            p = img_dir / b[1]
            if p.exists():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f"<img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)
