"""HTML building blocks of the report pages: escaping and number formatting, tables, the page skeleton
(title, navigation, sections, footer) and its CSS. The run report (report.write) and the inspect page
(report.inspect_sections) are both built from them."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from featurepipe.rundir.layout import REPORT_DIR

# The colours of charts and tables: the best (refit and saved) configuration stands out in orange.
BEST_COLOUR = "#e8730c"
OTHER_COLOUR = "#4c78a8"   # every other configuration, and the bars of plain counts


def esc(value: Any) -> str:
    """Text (or anything printable) made safe inside HTML elements and attribute values."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    """A number with `digits` decimals; "–" for missing or NaN; text that is not a number, escaped."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return esc(value) if value not in (None, "") else "–"
    if math.isnan(number):
        return "–"
    if number.is_integer() and abs(number) < 1e15 and digits == 0:
        return str(int(number))
    return f"{number:.{digits}f}"


def cell(value: Any) -> str:
    """A table cell of any CSV value: integers as integers, other numbers with 4 decimals."""
    if isinstance(value, (bool, np.bool_)):
        return esc(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else num(value, 4)
    return esc(value)


def html_table(columns: list[str], rows: list[list[str]], numeric: Optional[set[int]] = None, cls: str = "",
               row_classes: Optional[list[str]] = None, wide: Optional[set[int]] = None) -> str:
    """A table in a horizontally scrolling box; rows hold ready-escaped HTML, `numeric` are column indexes
    to right-align, `row_classes` a CSS class per row ("" for none), `wide` the columns hidden on a phone
    (the less important ones, so the key numbers fit 390 px)."""
    numeric, wide = numeric or set(), wide or set()

    def klass(i: int) -> str:
        names = " ".join(n for n, on in (("num", i in numeric), ("wide", i in wide)) if on)
        return f' class="{names}"' if names else ""

    head = "".join(f"<th{klass(i)}>{esc(c)}</th>" for i, c in enumerate(columns))
    body = []
    for r, row in enumerate(rows):
        klass_ = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f"<td{klass(i)}>{v}</td>" for i, v in enumerate(row))
        body.append(f"<tr{klass_}>{cells}</tr>")
    table_class = f' class="{cls}"' if cls else ""
    return f'<div class="scroll"><table{table_class}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def kv_table(pairs: list[tuple[str, Any]]) -> str:
    """A two-column table of (label, ready-escaped HTML) pairs."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def data_uri(png: bytes) -> str:
    """PNG bytes as a data URI: the page embeds its images so it can be mailed or archived on its own."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


CSS = """
:root { --ink:#1f2328; --muted:#57606a; --line:#d8dee4; --soft:#f6f8fa; --best:#fff1e0; --accent:#e8730c; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; }
p.sub, .muted { color: var(--muted); }
nav { margin: 14px 0 6px; font-size: 13px; display: flex; flex-wrap: wrap; gap: 4px 16px; }
nav a { color: #0969da; text-decoration: none; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; background: var(--soft); }
.card .v { font-size: 20px; font-weight: 600; }
.card .k { font-size: 12px; color: var(--muted); }
.card.best { background: var(--best); border-color: #f0c08a; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 8px 28px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tr.best, tr.best:nth-child(even) { background: var(--best); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { background: none; color: var(--muted); font-weight: 500; white-space: nowrap; }
table.confusion td.cm { text-align: center; min-width: 54px; font-variant-numeric: tabular-nums; }
table.confusion td.cm b { display: block; font-size: 14px; }
table.confusion td.cm span { font-size: 11px; opacity: .8; }
table.confusion td.cm.zero { color: #b0b7bf; }
table.confusion thead th.cls { white-space: normal; overflow-wrap: anywhere; min-width: 64px; max-width: 110px;
                               text-align: center; padding: 5px 6px; }
table.confusion th.corner { font-size: 11px; color: var(--muted); font-weight: 500; }
code, pre, .path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.path { word-break: break-all; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px;
      overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
pre.cmd { background: #1f2328; color: #f6f8fa; border: none; white-space: pre; word-break: normal; }
img.chart { max-width: 100%; height: auto; display: block; margin: 8px 0 14px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 14px; }
figure.miss { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff; }
figure.miss .thumb { height: 132px; display: flex; align-items: center; justify-content: center;
                     background: var(--soft); border-radius: 4px; }
figure.miss img { max-width: 128px; max-height: 128px; }
figure.miss .noimg { color: var(--muted); font-size: 12px; text-align: center; padding: 8px; }
figure.miss figcaption { font-size: 12px; margin-top: 6px; }
figure.miss .lab { font-weight: 600; }
figure.miss .true { color: #1a7f37; }
figure.miss .pred { color: #cf222e; }
figure.miss .path { color: var(--muted); font-size: 10.5px; display: block; margin-top: 3px; }
ul.warn li { color: #7d4e00; }
.note { font-size: 12.5px; color: var(--muted); }
footer { margin-top: 40px; font-size: 12px; color: var(--muted); }
details.config summary { cursor: pointer; color: #0969da; margin: 10px 0; }
ul.members { margin: 4px 0 12px; padding-left: 22px; }
p.message { border-left: 3px solid var(--line); padding-left: 10px; }
.card .ci { font-size: 14px; font-weight: 500; margin-left: 6px; }
/* A phone (390 px): the key numbers without horizontal scrolling. The headline cards compact, two a row
   under the full-width headline; tables drop their less important columns ("wide") and scroll inside
   their own box; charts scale to the viewport (they are drawn narrow enough to stay legible). */
@media (max-width: 600px) {
  main { padding: 12px 12px 40px; }
  h1 { font-size: 20px; }
  h2 { font-size: 17px; margin-top: 26px; }
  nav { font-size: 12px; gap: 2px 10px; }
  .cards { gap: 6px; margin: 10px 0; }
  .card { min-width: 0; flex: 1 1 40%; padding: 6px 10px; }
  .card.headline { flex-basis: 100%; }
  .card .k { font-size: 11px; }
  .card .v { font-size: 17px; }
  .card .long { display: none; }
  .grid2 { grid-template-columns: minmax(0, 1fr); }
  .wide { display: none; }
  th, td { padding: 4px 6px; }
  pre.cmd { font-size: 11px; }
}
"""


def _section(title: str, body: str) -> str:
    """One <section>, its anchor the title in lower case with hyphens (what the navigation links to)."""
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def render_page(config: dict, run_dir: Path, sections: list[tuple[str, str]], missing: list[str]) -> str:
    """The whole page: its title from the dataset and backbone in `config`, a link to every (title, html)
    section, the optional inputs that were `missing`, the sections and the footer."""
    dataset = config.get("dataset") or {}
    source = dataset.get("source") or str(run_dir)
    backbone = (config.get("backbone") or {}).get("name", "")
    title = f"featurepipe report: {Path(source).name}" + (f" / {backbone}" if backbone else "")
    nav = "".join(f'<a href="#{esc(t.lower().replace(" ", "-"))}">{esc(t)}</a>' for t, _ in sections)
    # `missing` (the optional inputs absent) stays in ReportResult for scripts; the page does not list
    # internal file names ("Not in this run directory: holdout.csv, ..."), which told a reader nothing.
    absent = ""
    body = "".join(_section(t, b) for t, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><p class=\"sub path\">{esc(run_dir.resolve())}</p>"
            f"<nav>{nav}</nav>{absent}{body}"
            f'<footer>Written by <code>featurepipe report</code>. All charts and thumbnails are embedded; '
            f'the charts are also saved as PNG files in <code>{esc(run_dir / REPORT_DIR)}</code>.</footer>'
            f"</main></body></html>\n")
