"""Self-contained HTML pages for people to read: the scaling report and the run report.

One file that opens offline, in a browser or as an MLflow artifact: pictures embedded as base64
PNG, the style inline, no script, font or style sheet from elsewhere. Headline numbers carry a
``data-key`` attribute naming the JSON field they show, so a reader (and the browser tests)
can find them and compare them with the JSON written beside the page.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Iterable

STYLE = ("body{font-family:sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;color:#222}"
         "h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 7px;font-size:12px;"
         "text-align:right;overflow-wrap:anywhere}th{background:#eee}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%;display:block;margin:.5em 0}.wrap{overflow-x:auto;max-width:100%}"
         ".note{color:#a40;font-weight:bold}.muted{color:#666;font-size:12px}"
         "table.kv th{text-align:left;font-weight:normal;background:#f4f4f4}table.kv td{text-align:left;font-size:13px}"
         "pre{background:#f6f6f6;padding:.6em;font-size:11px;max-height:28em;overflow:auto}")


def esc(v: Any) -> str:
    return html.escape(str(v))


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers as a table shows them: integers with separators, floats to ``digits`` significant
    digits, NaN / None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-" if math.isnan(v) else str(v)
        if 1e3 <= abs(v) < 1e10:  # counts and rates: 56,560 points/s, 4,915,200 points
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1e3 else f"{v:.3e}"
    return str(v)


class Keyed:
    """A value shown with ``data-key``: the name of the JSON field it comes from."""

    def __init__(self, key: str, value: Any, text: str | None = None) -> None:
        self.key, self.value = key, value
        self.text = fmt(value) if text is None else text

    def html(self, tag: str = "span") -> str:
        return f'<{tag} data-key="{esc(self.key)}">{esc(self.text)}</{tag}>'


def cell(c: Any) -> str:
    if isinstance(c, Keyed):
        return c.html("td")
    return f"<td>{esc(fmt(c))}</td>"


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def key_values(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of labelled values (headline numbers)."""
    rows = []
    for k, v in items:
        shown = v.html("td") if isinstance(v, Keyed) else f"<td>{esc(fmt(v))}</td>"
        rows.append(f"<tr><th>{esc(k)}</th>{shown}</tr>")
    return f'<div class="wrap"><table class="kv"><tbody>{"".join(rows)}</tbody></table></div>'


def image(png: bytes | str | Path, alt: str) -> str:
    """An ``<img>`` holding the PNG itself (bytes or a file)."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}"/>'


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def page(title: str, sections: list[tuple[str, str, str]], subtitle: str = "") -> str:
    """A whole document; ``sections`` are (id, heading, inner HTML)."""
    body = "\n".join(f'<section id="{esc(sid)}"><h2>{esc(head)}</h2>{inner}</section>'
                     for sid, head, inner in sections)
    sub = f'<p class="muted">{esc(subtitle)}</p>' if subtitle else ""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{sub}\n{body}\n</body></html>\n")
