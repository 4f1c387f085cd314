r"""The report's text as Markdown and as a standalone HTML page, from one list of blocks.

A block is ``("h1" | "h2" | "p", text)``, ``("img", file, caption)`` or ``("table", headers, rows)``.

Example:
    >>> to_markdown([("h2", "Scores"), ("table", ["score", "mean"], [["rouge_l", "0.5"]])])
    '## Scores\n\n| score | mean |\n|---|---|\n| rouge_l | 0.5 |\n'
"""

from __future__ import annotations

import html
from typing import Sequence


def to_markdown(blocks: Sequence[tuple]) -> str:
    lines: list[str] = []
    for kind, *content in blocks:
        if kind == "h1":
            lines += [f"# {content[0]}", ""]
        elif kind == "h2":
            lines += [f"## {content[0]}", ""]
        elif kind == "p":
            lines += [content[0], ""]
        elif kind == "img":
            lines += [f"![{content[1]}]({content[0]})", ""]
        elif kind == "table":
            headers, rows = content
            lines += [_md_row(headers), "|" + "---|" * len(headers), *(_md_row(r) for r in rows), ""]
    return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_html(blocks: Sequence[tuple], title: str) -> str:
    body: list[str] = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "img":
            body.append(f'<img src="{html.escape(content[0])}" alt="{html.escape(content[1])}">')
        elif kind == "table":
            headers, rows = content
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:90%}img{max-width:100%}"
    return f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
