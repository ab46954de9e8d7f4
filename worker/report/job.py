"""The per-job HTML report: one self-contained index.html next to the grids.

`render_report(manifest, files)` returns {"index.html", "depth.png"}, keyed
relative to the job folder like the engine's files. The page has inline CSS
and script only. Its images (input, grids, overlays, depth chart) are embedded
as data: URIs while they total at most `INLINE_MAX_BYTES`, so the one file
works anywhere, a presigned link to index.html included (a presigned URL signs
one object only; relative requests from it would be refused by a private
bucket). Larger jobs link their images by relative keys, which works from the
downloaded folder (`actviz fetch`) or a bucket that allows reads.

Every string that comes from the model or the manifest is escaped: layer names
are chosen by whoever built the model. Keys are only linked when they are
plain relative paths (see `safe_href`).

Page pieces shared with the batch gallery (`worker.report.gallery`): `page_html`,
`safe_href`, `grid_data`, `format_shape`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from typing import Any

from producer.contract import DEPTH_CHART_FILE, REPORT_FILE
from producer.storage import content_type_for
from worker.report.depth_chart import render_depth_chart

DEPTH_CHART = DEPTH_CHART_FILE
INDEX = REPORT_FILE
INLINE_MAX_BYTES = 6 * 1024 * 1024  # embed the images while they total at most this
TOP_TILE_PX = 96  # top-k tiles are drawn this many CSS pixels on their long side
STRIP_PX = 32  # height of a non-spatial layer's strip of values
DEAD_MARK_LIMIT = 1024  # more dead channels than this are listed, not outlined

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_STAT_COLUMNS = ("mean", "std", "min", "max", "sparsity")


def render_report(
    manifest: dict[str, Any],
    files: dict[str, bytes],
    *,
    inline_max_bytes: int = INLINE_MAX_BYTES,
) -> dict[str, bytes]:
    """One job's manifest (+ its files) -> {"index.html": UTF-8, "depth.png": PNG}.

    `files` are the job's artifacts keyed relative to the job folder. The page
    embeds the images it shows when they are all in `files` and total at most
    `inline_max_bytes`, else links them by relative key. Layers without a grid
    (no spatial output) get their stats only.
    """
    layers = list(manifest.get("layers") or [])
    depth = render_depth_chart(layers)
    links = _Links(_image_keys(manifest), {**files, DEPTH_CHART: depth}, inline_max_bytes)
    body = [
        _header(manifest, links),
        _depth_section(links),
        *(_layer_section(position, layer, links) for position, layer in enumerate(layers)),
    ]
    data = {"layers": [grid_data(layer, "") for layer in layers], "inline": links.inline}
    title = f"actviz · {_model_name(manifest)}"
    if manifest.get("job_id"):
        title += f" · {manifest['job_id']}"
    return {INDEX: page_html(title, "\n".join(body), data), DEPTH_CHART: depth}


class _Links:
    """Where the page gets its images: data: URIs when all fit the budget, else keys."""

    def __init__(self, keys: list[str], files: dict[str, bytes], limit: int) -> None:
        keys = [k for k in keys if safe_href(k)]
        self._files = files
        self.inline = all(k in files for k in keys) and sum(len(files[k]) for k in keys) <= limit

    def src(self, key: Any) -> str | None:
        """The escaped src for `key`, or None for a key that is not a plain relative path."""
        href = safe_href(key)
        if href is None or not self.inline:
            return href
        data = base64.b64encode(self._files[key]).decode()
        return f"data:{content_type_for(key)};base64,{data}"


def _image_keys(manifest: dict[str, Any]) -> list[str]:
    keys = [manifest.get("input") or "", DEPTH_CHART]
    for layer in manifest.get("layers") or []:
        keys.append((layer.get("grid") or {}).get("png") or "")
        keys.append(layer.get("overlay") or "")
    return [k for k in keys if k]


# ---- shared page pieces ----------------------------------------------------


def safe_href(key: Any, prefix: str = "") -> str | None:
    """A relative key such as 'layers/03-conv.png' as an escaped href, or None.

    Only plain relative keys pass: no scheme, no leading '/', no '..', no
    quotes or spaces; `prefix` (e.g. '../../jobs/<id>/') is trusted.
    """
    if not isinstance(key, str) or not _SAFE_KEY.match(key) or ".." in key.split("/"):
        return None
    return html.escape(prefix + key, quote=True)


def tile_style(grid: dict[str, Any], channel: int, long_side: int) -> str:
    """Inline CSS that sizes and positions a sprite of one channel's tile.

    The grid is scaled so the tile's long side is `long_side` CSS pixels and
    positioned so only that tile shows; the page script sets the grid image
    itself (from the layer's <img>, so an embedded grid is not repeated).
    """
    tile_h, tile_w = int(grid["tile_h"]), int(grid["tile_w"])
    step_h, step_w = tile_h + int(grid["separator"]), tile_w + int(grid["separator"])
    row, col = divmod(channel, int(grid["cols"]))
    scale = long_side / max(tile_h, tile_w)
    return (
        f"width:{tile_w * scale:.1f}px;height:{tile_h * scale:.1f}px;"
        f"background-size:{int(grid['width']) * scale:.1f}px {int(grid['height']) * scale:.1f}px;"
        f"background-position:-{col * step_w * scale:.1f}px -{row * step_h * scale:.1f}px"
    )


def grid_data(layer: dict[str, Any], prefix: str) -> dict[str, Any]:
    """What the page script needs about one layer: name, grid href + geometry, stats."""
    grid = layer.get("grid") or None
    href = safe_href(grid.get("png"), prefix) if grid else None
    stats = layer.get("stats") or {}
    return {
        "name": str(layer.get("name", "")),
        "grid": html.unescape(href) if href else None,
        "geometry": _geometry(grid) if href else None,
        "stats": {key: [_round(v) for v in stats.get(key) or []] for key in _STAT_COLUMNS},
        "dead": stats.get("dead") or [],
    }


def _round(value: Any) -> Any:
    # Five significant digits keep the embedded stats small; the manifest has them all.
    return float(f"{value:.5g}") if isinstance(value, float) else value


def page_html(title: str, body: str, data: dict[str, Any]) -> bytes:
    """The full page: inline CSS, `body` (already escaped HTML), data + script."""
    # JSON inside <script> must not contain '</script>' or '<!--'.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{_LINK_NOTE}\n{body}\n"
        '<div id="lightbox" hidden><div class="box" role="dialog" aria-modal="true">'
        '<button type="button" class="close" aria-label="close">×</button>'
        '<h3 id="lb-title"></h3><div id="lb-tiles"></div></div></div>\n'
        f'<script type="application/json" id="actviz-data">{payload}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    ).encode()


def format_number(value: Any) -> str:
    """A stat as short text: 4 significant digits, '–' for missing."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    return f"{value:.4g}"


def format_shape(shape: Any) -> str:
    """[None, 74, 74, 32] -> '(None, 74, 74, 32)', escaped."""
    if isinstance(shape, (list, tuple)):
        return html.escape("(" + ", ".join(str(d) for d in shape) + ")")
    return html.escape(str(shape))


# ---- page sections ---------------------------------------------------------


def _model_name(manifest: dict[str, Any]) -> str:
    model = manifest.get("model") or {}
    if model.get("name"):
        return str(model["name"])
    uri = str(model.get("uri") or "model")
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _header(manifest: dict[str, Any], links: _Links) -> str:
    model = manifest.get("model") or {}
    image = manifest.get("image") or {}
    pre = manifest.get("preprocessing") or {}
    norm = manifest.get("normalization") or {}
    rows = [
        ("model", _escaped(model.get("uri"))),
        ("sha256", _escaped((model.get("sha256") or "")[:16])),
        ("input shape", format_shape(model.get("input_shape"))),
        ("image", _escaped(image.get("uri") or image.get("sha256"))),
        ("original size", format_shape(image.get("original_size"))),
        ("preprocessing", _describe(pre, ("size", "channels", "scale", "resample", "formula"))),
        ("normalization", _describe(norm, ("mode", "percentile"))),
        ("colormap", _escaped(manifest.get("colormap"))),
        ("timings (ms)", _describe(manifest.get("timings_ms") or {}, None)),
    ]
    table = "".join(
        f"<tr><th>{label}</th><td>{value}</td></tr>"
        for label, value in rows
        if value not in (None, "", "()", "None")
    )
    input_href = links.src(manifest.get("input"))
    figure = (
        f'<figure class="input"><img src="{input_href}" alt="input as the model saw it">'
        "<figcaption>input as the model saw it</figcaption></figure>"
        if input_href
        else ""
    )
    job = manifest.get("job_id")
    job_line = f'<p class="job">job {html.escape(str(job))}</p>' if job else ""
    return (
        f"<header><h1>{html.escape(_model_name(manifest))}</h1>{job_line}"
        f'<div class="summary">{figure}<table class="meta">{table}</table></div></header>'
    )


def _describe(values: dict[str, Any], keys: tuple[str, ...] | None) -> str | None:
    """'key=value, ...' for the present keys, escaped; None when none is present."""
    picked = [(k, values[k]) for k in (keys or values) if k in values and values[k] is not None]
    if not picked:
        return None
    parts = []
    for key, value in picked:
        if isinstance(value, list):
            shown = format_shape(value)
        elif isinstance(value, float):
            shown = format_number(value)
        else:
            shown = html.escape(str(value))
        parts.append(f"{html.escape(str(key))}={shown}")
    return ", ".join(parts)


def _escaped(value: Any) -> str | None:
    return None if value in (None, "") else html.escape(str(value))


def _depth_section(links: _Links) -> str:
    return (
        '<section class="depth"><h2>Sparsity and mean activation by depth</h2>'
        f'<img id="depth-chart" src="{links.src(DEPTH_CHART)}" alt="sparsity and mean '
        'activation against layer depth"></section>'
    )


def _layer_section(position: int, layer: dict[str, Any], links: _Links) -> str:
    name = html.escape(str(layer.get("name", "")))
    summary = layer.get("summary") or {}
    stats = layer.get("stats") or {}
    grid = layer.get("grid") or None
    href = links.src(grid.get("png")) if grid else None
    heading = (
        f'<h2 id="layer-{position}">{name} <span class="cls">'
        f"{html.escape(str(layer.get('class_name', '')))}</span>"
        f'<span class="shape">{format_shape(layer.get("output_shape"))}</span></h2>'
    )
    side = [_summary_table(summary)]
    dead = [int(c) for c in stats.get("dead") or []]
    if dead:
        listed = ", ".join(str(c) for c in dead[:64]) + (" …" if len(dead) > 64 else "")
        side.append(f'<p class="dead">dead channels ({len(dead)}): {listed}</p>')
    main = '<p class="note">no spatial output: stats only</p>'
    if href:
        main = _grid_figure(position, layer, grid, href, dead)
        top = [int(c) for c in summary.get("top_k") or []]
        if top and layer.get("spatial", True):
            side.append(_top_tiles(position, grid, top, stats))
    overlay = links.src(layer.get("overlay"))
    if overlay:
        side.append(
            f'<figure class="overlay"><img src="{overlay}" alt="overlay of {name}">'
            "<figcaption>mean activation over the input</figcaption></figure>"
        )
    parts = [heading, f'<div class="layerbody">{main}<div class="side">{"".join(side)}</div></div>']
    return f'<section class="layer" data-layer="{position}">{"".join(parts)}</section>'


def _summary_table(summary: dict[str, Any]) -> str:
    cells = "".join(f"<td>{format_number(summary.get(k))}</td>" for k in _STAT_COLUMNS)
    head = "".join(f"<th>{k}</th>" for k in _STAT_COLUMNS)
    return (
        f'<table class="stats"><tr>{head}<th>dead</th></tr>'
        f"<tr>{cells}<td>{format_number(summary.get('dead_count'))}</td></tr></table>"
    )


def _grid_figure(
    position: int, layer: dict[str, Any], grid: dict[str, Any], href: str, dead: list[int]
) -> str:
    geometry = _geometry(grid)
    marks = ""
    if geometry and len(dead) <= DEAD_MARK_LIMIT:
        marks = "".join(_dead_mark(geometry, c) for c in dead if c < geometry["channels"])
    name = html.escape(str(layer.get("name", "")))
    size = ""
    if geometry and not layer.get("spatial", True):
        # A strip of values (Dense, Flatten): keep it a strip instead of scaling it square.
        size = (
            f' style="height:{STRIP_PX}px;width:{min(560, max(STRIP_PX, geometry["width"] * 2))}px"'
        )
    return (
        f'<figure class="grid"><div class="gridwrap">'
        f'<img class="grid" data-layer="{position}" data-item="0" src="{href}"{size} '
        f'alt="channel grid of {name}" title="click a tile to enlarge">{marks}</div>'
        f"<figcaption>{_grid_caption(geometry)}</figcaption></figure>"
    )


def _grid_caption(geometry: dict[str, int] | None) -> str:
    if not geometry:
        return "channel grid"
    count = geometry["channels"]
    text = (
        f"{count} channel{'s' if count != 1 else ''}, {geometry['rows']}×{geometry['cols']} tiles"
    )
    if geometry.get("downsample", 1) > 1:
        text += f", every {geometry['downsample']}th pixel"
    return text + "; click a tile to enlarge"


def _dead_mark(geometry: dict[str, int], channel: int) -> str:
    row, col = divmod(channel, geometry["cols"])
    step_w = geometry["tile_w"] + geometry["separator"]
    step_h = geometry["tile_h"] + geometry["separator"]
    left = 100.0 * col * step_w / geometry["width"]
    top = 100.0 * row * step_h / geometry["height"]
    width = 100.0 * geometry["tile_w"] / geometry["width"]
    height = 100.0 * geometry["tile_h"] / geometry["height"]
    return (
        f'<span class="deadmark" title="channel {channel} is dead" style="left:{left:.3f}%;'
        f'top:{top:.3f}%;width:{width:.3f}%;height:{height:.3f}%"></span>'
    )


def _top_tiles(position: int, grid: dict[str, Any], top: list[int], stats: dict[str, Any]) -> str:
    geometry = _geometry(grid)
    if not geometry:
        return ""
    means = stats.get("mean") or []
    tiles = []
    for channel in top:
        if not 0 <= channel < geometry["channels"]:
            continue
        mean = format_number(means[channel]) if channel < len(means) else "–"
        tiles.append(
            f'<figure class="top"><button type="button" class="tile" data-layer="{position}" '
            f'data-channel="{channel}" style="{tile_style(geometry, channel, TOP_TILE_PX)}" '
            f'aria-label="channel {channel}"></button>'
            f"<figcaption>#{channel} · mean {mean}</figcaption></figure>"
        )
    return f'<div class="topk"><h3>top {len(tiles)} channels by mean</h3>{"".join(tiles)}</div>'


def _geometry(grid: dict[str, Any] | None) -> dict[str, int] | None:
    """The grid geometry as ints, or None when the manifest lacks it."""
    keys = ("rows", "cols", "tile_h", "tile_w", "channels")
    if not grid or any(not isinstance(grid.get(k), int) for k in keys):
        return None
    geometry = {k: int(grid[k]) for k in keys}
    geometry["separator"] = int(grid.get("separator") or 0)
    geometry["downsample"] = int(grid.get("downsample") or 1)
    geometry["width"] = int(
        grid.get("width")
        or geometry["cols"] * geometry["tile_w"] + (geometry["cols"] - 1) * geometry["separator"]
    )
    geometry["height"] = int(
        grid.get("height")
        or geometry["rows"] * geometry["tile_h"] + (geometry["rows"] - 1) * geometry["separator"]
    )
    return geometry


_LINK_NOTE = (
    '<p id="linknote" class="linknote" hidden>Some images did not load. This page links '
    "its images relative to itself: open it from its folder (for example after "
    "<code>actviz fetch JOB --out DIR</code>) or from a bucket that allows reading the "
    "job's objects. A presigned link signs index.html alone.</p>"
)

_CSS = """
:root{--fg:#1d2329;--muted:#5f6b76;--line:#dde3e8;--bg:#f7f9fa;--accent:#2c6fbb}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);
background:var(--bg);margin:0;padding:0 24px 48px;max-width:1200px;margin-inline:auto}
h1{font-size:22px;margin:20px 0 2px}h2{font-size:17px;margin:0 0 8px}h3{font-size:14px;margin:8px 0}
.job{color:var(--muted);margin:0 0 12px;font-family:ui-monospace,monospace;font-size:12px}
.summary{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
figure{margin:0}figcaption{color:var(--muted);font-size:12px}
.input img{width:180px;image-rendering:pixelated;border:1px solid var(--line);display:block}
table{border-collapse:collapse}
.meta th{text-align:left;color:var(--muted);font-weight:500;padding:2px 12px 2px 0;vertical-align:top}
.meta td{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:14px 16px;margin:16px 0}
.depth img{max-width:100%;display:block}
.cls{color:var(--muted);font-weight:400;font-size:13px;margin-left:8px}
.shape{font-family:ui-monospace,monospace;font-weight:400;font-size:12px;margin-left:8px;color:var(--muted)}
.stats{font-family:ui-monospace,monospace;font-size:12px;margin-bottom:8px}
.stats th,.stats td{border:1px solid var(--line);padding:2px 8px;text-align:right}
.stats th{background:var(--bg);font-weight:500}
.dead{color:#b03a2e;font-size:12px;margin:4px 0}.note{color:var(--muted)}
.gridwrap{position:relative;display:inline-block;max-width:100%;line-height:0}
img.grid{max-width:100%;width:560px;image-rendering:pixelated;cursor:zoom-in;display:block}
.deadmark{position:absolute;outline:2px solid #e74c3c;outline-offset:-1px;pointer-events:none;
background:repeating-linear-gradient(45deg,transparent 0 4px,rgba(231,76,60,.35) 4px 6px)}
.topk{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-end}.topk h3{width:100%}
.tile{display:block;border:1px solid var(--line);padding:0;cursor:zoom-in;image-rendering:pixelated;
background-repeat:no-repeat}
.overlay img{width:200px;margin-top:12px;image-rendering:pixelated}
.layerbody{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}.layerbody>figure.grid{flex:0 1 560px;max-width:100%}.side{flex:1;min-width:300px}
#lightbox{position:fixed;inset:0;background:rgba(20,24,28,.72);display:flex;align-items:center;
justify-content:center;z-index:10}#lightbox[hidden]{display:none}
.box{background:#fff;border-radius:8px;padding:16px 20px;max-width:95vw;max-height:95vh;overflow:auto;position:relative}
.close{position:absolute;right:8px;top:6px;border:0;background:none;font-size:22px;cursor:pointer}
#lb-tiles{display:flex;gap:16px;flex-wrap:wrap}
#lb-tiles .tile{cursor:default}
.lbstats{font-family:ui-monospace,monospace;font-size:12px;margin-top:6px}
.lbstats td{padding:0 10px 0 0}
.gallerywrap{overflow-x:auto}
.gallery td,.gallery th{padding:6px;vertical-align:top;text-align:center}
.gallery th.lname{text-align:left;font-size:13px;white-space:nowrap}
.gallery .failed{color:#b03a2e;font-weight:400}
.linknote{background:#fdecea;border:1px solid #f5b7b1;border-radius:6px;padding:8px 12px;margin-top:16px}
.linknote[hidden]{display:none}
.gallery img.grid{width:340px}
.gallery .input img{width:120px;margin:0 auto}
"""

# Maps a click on a grid image to its channel (same formula as the manifest:
# row c // cols, col c % cols, tiles tile + separator apart) and shows the tile
# of that channel, from one grid or from every grid of a gallery row, enlarged.
_SCRIPT = r"""
(function(){
const DATA=JSON.parse(document.getElementById('actviz-data').textContent);
const box=document.getElementById('lightbox');
const fmt=v=>(v===null||v===undefined)?'–':Number(v).toPrecision(4).replace(/\.?0+$/,'');
function items(layer){return DATA.rows?DATA.rows[layer]:[DATA.layers[layer]];}
function gridImg(layer,i){return document.querySelector('img.grid[data-layer="'+layer+'"][data-item="'+i+'"]');}
function sprite(el,src,g,c,size){
  const row=Math.floor(c/g.cols),col=c%g.cols,s=size/Math.max(g.tile_w,g.tile_h);
  el.style.width=(g.tile_w*s)+'px';el.style.height=(g.tile_h*s)+'px';
  el.style.backgroundImage='url("'+src+'")';
  el.style.backgroundSize=(g.width*s)+'px '+(g.height*s)+'px';
  el.style.backgroundPosition=(-col*(g.tile_w+g.separator)*s)+'px '+(-row*(g.tile_h+g.separator)*s)+'px';
}
function show(layer,c){
  const host=document.getElementById('lb-tiles');host.replaceChildren();
  let title=null;
  items(layer).forEach((it,i)=>{
    const img=gridImg(layer,i);
    if(!it||!it.geometry||!img||c>=it.geometry.channels)return;
    title=title||it.name+' · channel '+c;
    const fig=document.createElement('figure'),tile=document.createElement('div');
    tile.className='tile';sprite(tile,img.src,it.geometry,c,DATA.rows?220:360);fig.appendChild(tile);
    const cap=document.createElement('figcaption');
    if(it.label){cap.textContent=it.label;}
    fig.appendChild(cap);
    const t=document.createElement('table');t.className='lbstats';
    for(const k of ['mean','std','min','max','sparsity']){
      const r=t.insertRow();r.insertCell().textContent=k;r.insertCell().textContent=fmt((it.stats[k]||[])[c]);}
    const r=t.insertRow();r.insertCell().textContent='dead';
    r.insertCell().textContent=(it.dead||[]).includes(c)?'yes':'no';
    fig.appendChild(t);host.appendChild(fig);
  });
  if(title===null)return;
  document.getElementById('lb-title').textContent=title;
  box.hidden=false;box.dataset.layer=layer;box.dataset.channel=c;
}
document.querySelectorAll('img.grid').forEach(img=>{
  img.addEventListener('click',ev=>{
    const layer=+img.dataset.layer,item=items(layer)[+img.dataset.item];
    if(!item||!item.geometry)return;
    const g=item.geometry,r=img.getBoundingClientRect();
    const x=(ev.clientX-r.left)*g.width/r.width,y=(ev.clientY-r.top)*g.height/r.height;
    const col=Math.floor(x/(g.tile_w+g.separator)),row=Math.floor(y/(g.tile_h+g.separator));
    if(col<0||col>=g.cols||row<0)return;
    const c=row*g.cols+col;if(c<g.channels)show(layer,c);
  });
});
document.querySelectorAll('button.tile').forEach(b=>{
  const img=gridImg(b.dataset.layer,0);
  if(img)b.style.backgroundImage='url("'+img.src+'")';
  b.addEventListener('click',()=>show(+b.dataset.layer,+b.dataset.channel));
});
box.addEventListener('click',ev=>{if(ev.target===box||ev.target.classList.contains('close'))box.hidden=true;});
document.addEventListener('keydown',ev=>{if(ev.key==='Escape')box.hidden=true;});
// Linked (not embedded) images fail from a presigned link to this page alone: say why.
const note=document.getElementById('linknote');
const broken=()=>{note.hidden=false;};
document.querySelectorAll('img').forEach(img=>{
  if(img.complete&&img.naturalWidth===0)broken();else img.addEventListener('error',broken);
});
})();
"""
