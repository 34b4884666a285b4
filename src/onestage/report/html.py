"""Pieces of one self-contained HTML page: escaped text, embedded images, sortable tables,
plotly charts, and the page itself.

Self-contained means no network and no server: images are base64 data URIs, the chart data
are inline JSON, and plotly.js (from the installed ``plotly`` package, never a CDN) is
embedded once, gzip-compressed and base64-encoded (about 2 MB instead of 4.8), and
unpacked by the browser's ``DecompressionStream`` when the page opens. The only
hand-written script is that loader and a click-to-sort for tables.
"""

from __future__ import annotations

import base64
import gzip
import html
import io
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

MAX_IMAGE_SIDE = 720  # embedded images are shrunk to this (pixels, longer side)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, digits: int = 4) -> str:
    """Numbers as a person reads them; None / NaN as a dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.4g}"
    return str(x)


def image_data_uri(path: Path) -> str:
    """The image as a data URI, shrunk to ``MAX_IMAGE_SIDE`` and stored as PNG or JPEG,
    whichever is smaller (drawn detections survive JPEG at quality 85)."""
    with Image.open(path) as im:
        im.load()
        img = im.convert("RGB")
    if max(img.size) > MAX_IMAGE_SIDE:
        img.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    best: tuple[int, str, bytes] | None = None
    for fmt_name, mime, kwargs in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 85})):
        buf = io.BytesIO()
        img.save(buf, fmt_name, **kwargs)
        data = buf.getvalue()
        if best is None or len(data) < best[0]:
            best = (len(data), mime, data)
    assert best is not None
    return f"data:{best[1]};base64,{base64.b64encode(best[2]).decode()}"


def img(path: Path, caption: str | None = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{image_data_uri(path)}" alt="{esc(path.name)}">{cap}</figure>'


def gallery(paths: Sequence[Path], limit: int = 24) -> str:
    shown = list(paths)[:limit]
    more = f"<p class='note'>{len(paths) - limit} more not shown.</p>" if len(paths) > limit else ""
    return "<div class='gallery'>" + "".join(img(p, p.stem) for p in shown) + "</div>" + more


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, sortable: bool = False,
          table_id: str | None = None, digits: int | Sequence[int] = 4) -> str:
    """An HTML table. Each numeric cell keeps its exact value in ``data-value`` (what the
    sort and the tests read) and shows ``digits`` decimals (one number, or one per column);
    ``sortable`` sorts on a click on a header."""
    cls = ' class="sortable"' if sortable else ""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    head = f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = []
    for row in rows:
        cells = []
        for col, v in enumerate(row):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                value = "" if isinstance(v, float) and math.isnan(v) else repr(float(v))
                d = digits if isinstance(digits, int) else digits[col]
                cells.append(f'<td class="num" data-value="{value}">{esc(fmt(v, d))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{tid}{cls}>{head}<tbody>{''.join(body)}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    return table([], [(k, v) for k, v in pairs if v is not None])


def details(summary: str, content: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{content}</details>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def section(title: str, content: str, anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{content}</section>'


class Charts:
    """plotly figures of a page: ``add`` returns the div that the loader fills."""

    def __init__(self) -> None:
        self.figures: dict[str, str] = {}  # div id -> figure JSON

    def add(self, fig: Any) -> str:
        import plotly.io as pio

        div_id = f"chart{len(self.figures)}"
        self.figures[div_id] = pio.to_json(fig, validate=False, pretty=False)
        return f'<div class="chart" id="{div_id}"></div>'


@lru_cache(maxsize=1)
def _plotly_js_gz_b64() -> str:
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)).decode()


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{margin:16px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:12px}.note{color:#666;font-size:90%}
table{border-collapse:collapse;margin:8px 0;font-size:14px}td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:#aaa}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;max-width:280px}
.gallery img{max-width:280px;height:auto;border:1px solid #ddd}
figure img{max-width:100%;height:auto}figcaption{font-size:12px;color:#555}
.chart{width:100%;min-height:360px}.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}
"""

# Click a header of a sortable table: sort its rows by that column (numbers by data-value),
# a second click reverses.
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = t.tBodies[0], rows = Array.from(body.rows);
      var dir = th.dataset.dir === 'desc' ? 1 : -1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
      var key = function (r) { var c = r.cells[col], v = c.dataset.value;
        return v === undefined ? c.textContent : (v === '' ? -Infinity : parseFloat(v)); };
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        return (typeof x === 'number' ? x - y : String(x).localeCompare(String(y))) * dir; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

# Unpack plotly.js (gzip, base64) with the browser's own DecompressionStream, run it, draw.
LOADER_JS = """
(async function () {
  var t0 = performance.now();
  var figs = JSON.parse(document.getElementById('chart-data').textContent);
  if (Object.keys(figs).length === 0) { document.body.dataset.charts = 'ready'; return; }
  var packed = await fetch('data:application/gzip;base64,' + document.getElementById('plotly-gz').textContent);
  var stream = packed.body.pipeThrough(new DecompressionStream('gzip'));
  var s = document.createElement('script'); s.textContent = await new Response(stream).text();
  document.head.appendChild(s);
  var t1 = performance.now();
  for (var id in figs) {
    var f = figs[id];
    await Plotly.newPlot(id, f.data, f.layout || {}, {responsive: true, displaylogo: false});
  }
  document.body.dataset.chartsMs = Math.round(t1 - t0) + ' + ' + Math.round(performance.now() - t1);
  document.body.dataset.charts = 'ready';
})();
"""


def page(title: str, nav: Sequence[tuple[str, str]], body: str, charts: Charts) -> str:
    """The whole HTML document."""
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    data = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in charts.figures.items()) + "}"
    data = data.replace("</", "<\\/")  # keep a "</script>" inside a string from closing the tag
    plotly_js = f'<script id="plotly-gz" type="application/octet-stream">{_plotly_js_gz_b64()}</script>' \
        if charts.figures else ""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><nav>{links}</nav>{body}"
        f'<script id="chart-data" type="application/json">{data}</script>{plotly_js}'
        f"<script>{SORT_JS}</script><script>{LOADER_JS}</script></body></html>"
    )
