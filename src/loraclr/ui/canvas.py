"""The box-drawing canvas: a square standing for the image, on which a drag draws a region.

A Gradio HTML component (gradio >= 6 custom HTML: a template, scoped CSS and a script run on load). Its value is
:func:`canvas_value`: the boxes of the region table and, faintly behind them, the last image drawn, so it only
draws; a finished drag sends ``submit`` with ``{box: [x0, y0, x1, y1]}`` (fractions of the square) and the page
appends that row to the table, which redraws the canvas. Listeners sit on the component's root element, which
outlives re-renders.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from loraclr.ui.boxes import canvas_boxes

TEMPLATE = """
<div class="lc-canvas" data-testid="region-canvas" title="drag to draw a region">
  {{#if value.image}}<img class="lc-image" src="{{value.image}}" alt="the last image drawn">{{/if}}
  <div class="lc-hint">drag to draw a region</div>
  {{#each value.boxes}}
  <div class="lc-box lc-box-{{this.n}}" style="left:{{this.left}}%;top:{{this.top}}%;width:{{this.width}}%;height:{{this.height}}%"><span>{{this.label}}</span></div>
  {{/each}}
  <div class="lc-draft"></div>
</div>
"""

CSS = """
.lc-canvas { position: relative; width: 100%; max-width: 360px; aspect-ratio: 1 / 1; cursor: crosshair;
  user-select: none; touch-action: none; border: 1px solid #888; border-radius: 4px;
  background-color: #f4f4f4;
  background-image: linear-gradient(#ddd 1px, transparent 1px), linear-gradient(90deg, #ddd 1px, transparent 1px);
  background-size: 25% 25%; }
.lc-image { position: absolute; inset: 0; width: 100%; height: 100%; opacity: 0.45; pointer-events: none;
  image-rendering: pixelated; }
.lc-hint { position: absolute; bottom: 4px; right: 6px; font-size: 11px; color: #888; pointer-events: none; }
.lc-box, .lc-draft { position: absolute; box-sizing: border-box; pointer-events: none; }
.lc-box { border: 2px solid #d9480f; background: rgba(217, 72, 15, 0.12); }
.lc-box:nth-of-type(odd) { border-color: #1864ab; background: rgba(24, 100, 171, 0.12); }
.lc-box span { font-size: 11px; background: rgba(255, 255, 255, 0.8); padding: 0 3px; color: #222; }
.lc-draft { display: none; border: 2px dashed #333; }
"""

JS = """
let start = null;
const canvas = () => element.querySelector('.lc-canvas');
const at = (e) => {
  const r = canvas().getBoundingClientRect();
  const clip = (v) => Math.min(Math.max(v, 0), 1);
  return [clip((e.clientX - r.left) / r.width), clip((e.clientY - r.top) / r.height)];
};
const drawDraft = (p) => {
  const d = element.querySelector('.lc-draft');
  if (!d) return;
  const [x0, x1] = [Math.min(start[0], p[0]), Math.max(start[0], p[0])];
  const [y0, y1] = [Math.min(start[1], p[1]), Math.max(start[1], p[1])];
  Object.assign(d.style, {display: 'block', left: `${100 * x0}%`, top: `${100 * y0}%`,
                          width: `${100 * (x1 - x0)}%`, height: `${100 * (y1 - y0)}%`});
};
element.addEventListener('mousedown', (e) => {
  const c = canvas();
  if (!c || !c.contains(e.target) || e.button !== 0) return;
  start = at(e);
  e.preventDefault();
});
window.addEventListener('mousemove', (e) => { if (start && canvas()) drawDraft(at(e)); });
window.addEventListener('mouseup', (e) => {
  if (!start || !canvas()) { start = null; return; }
  const p = at(e);
  const box = [start[0], start[1], p[0], p[1]];
  start = null;
  const d = element.querySelector('.lc-draft');
  if (d) d.style.display = 'none';
  trigger('submit', {box: box});
});
"""


def canvas_value(rows: Any, image: str = "") -> dict[str, Any]:
    """What the canvas shows: the table's boxes and an image behind them (a data URI, or "" for none)."""
    return {"boxes": canvas_boxes(rows), "image": image or ""}


def data_uri(image) -> str:
    """A PIL image as a PNG data URI (small: the page's images are the model's native size)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def region_canvas(value: dict[str, Any] | None = None, **kw):
    """The canvas component (imports gradio: the ``ui`` extra)."""
    import gradio as gr

    return gr.HTML(value or canvas_value([]), html_template=TEMPLATE, css_template=CSS, js_on_load=JS, **kw)
