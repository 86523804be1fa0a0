"""The page `featurepipe serve` shows at /: drop or pick photos, see each one's top classes.

One self-contained HTML document (its CSS and script inline, no CDN, no web fonts: the machines it
runs on are often offline). The run's facts (classes, nested-CV accuracy, whether similar photos are
available) are embedded as JSON when the page is served; the script posts each photo on its own to
/predict (a large drop shows results as they come and stays under the upload limit) and draws the
answer with textContent only, so a file or class name is never read as HTML.
"""

from __future__ import annotations

import json

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>featurepipe serve</title>
<style>
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{font-size:18px;margin:0 0 4px}
header p{margin:0;color:#c8cfdb;font-size:13px}
main{max-width:980px;margin:0 auto;padding:20px}
#drop{border:2px dashed #8a94a6;border-radius:10px;padding:28px;text-align:center;background:#fff;cursor:pointer}
#drop.over{border-color:#2f6fde;background:#eef4ff}
#notice{color:#8a5a00;font-size:13px;margin:10px 0 0}
.card{display:flex;gap:16px;background:#fff;border-radius:10px;padding:14px;margin:14px 0;box-shadow:0 1px 3px #0002}
.card img.photo{width:140px;height:140px;object-fit:cover;border-radius:6px;background:#eee;flex:none}
.card .body{flex:1;min-width:0}
.card h2{font-size:15px;margin:0 0 8px;word-break:break-all}
.bar{display:flex;align-items:center;gap:8px;margin:3px 0}
.bar .name{width:160px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar .track{flex:1;height:10px;background:#e6e9ef;border-radius:5px;overflow:hidden}
.bar .fill{height:100%;background:#2f6fde}
.bar .p{width:56px;text-align:right;font-variant-numeric:tabular-nums}
.error{color:#b3261e}
.similar{display:flex;gap:8px;flex-wrap:wrap;margin-top:10px}
.similar figure{margin:0;width:88px;font-size:11px;color:#555}
.similar img{width:88px;height:88px;object-fit:cover;border-radius:4px;background:#eee;display:block}
.similar figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.muted{color:#777;font-size:12px}
</style></head>
<body>
<header><h1 id="title">featurepipe serve</h1><p id="facts"></p></header>
<main>
<label id="drop" for="files">Drop photos here, or click to pick them
<input id="files" type="file" name="files" accept="image/*" multiple hidden></label>
<p id="notice"></p>
<div id="results"></div>
</main>
<script id="info" type="application/json">__INFO__</script>
<script>
"use strict";
const info = JSON.parse(document.getElementById("info").textContent);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};
const pct = p => (100 * p).toFixed(1) + "%";
document.getElementById("title").textContent = "featurepipe serve: " + info.run;
const acc = info.nested_accuracy;
let facts = info.classes.length + " classes (" + info.classes.join(", ") + "), " + (info.model_kind || "") + " model";
if (acc) {
  facts += "; nested-CV accuracy " + pct(acc.mean);
  if (acc.low !== null && acc.high !== null) facts += " (95% interval " + pct(acc.low) + " to " + pct(acc.high) + ")";
} else {
  facts += "; no nested-CV accuracy recorded for this run";
}
document.getElementById("facts").textContent = facts;
if (!info.similar.available) {
  document.getElementById("notice").textContent = "Similar training photos are unavailable: " + info.similar.reason;
}

async function classify(file) {
  const card = el("div", {className: "card"});
  const photo = el("img", {className: "photo", alt: file.name, src: URL.createObjectURL(file)});
  const body = el("div", {className: "body"}, el("h2", {textContent: file.name}),
                  el("p", {className: "muted status", textContent: "classifying..."}));
  card.append(photo, body);
  document.getElementById("results").prepend(card);
  const form = new FormData();
  form.append("files", file, file.name);
  let answer, status;
  try {
    const response = await fetch("predict", {method: "POST", body: form});
    status = response.status;
    answer = await response.json();
  } catch (error) {
    answer = {error: "no answer from the server: " + error};
  }
  body.querySelector(".status").remove();
  const row = (answer.predictions || [])[0];
  if (!row || row.error) {
    body.append(el("p", {className: "error", textContent: (row && row.error) || answer.error || ("HTTP " + status)}));
    card.dataset.state = "error";
    return;
  }
  for (let i = 1; row["label_" + i] !== undefined; i++) {
    const p = row["prob_" + i];
    const bar = el("div", {className: "bar"}, el("span", {className: "name", textContent: row["label_" + i]}),
                   el("span", {className: "track"}, el("span", {className: "fill"})),
                   el("span", {className: "p", textContent: pct(p)}));
    bar.querySelector(".fill").style.width = pct(p);
    if (i === 1) bar.classList.add("top");
    body.append(bar);
  }
  if (row.similar && row.similar.length) {
    body.append(el("p", {className: "muted", textContent: "Most similar training photos:"}));
    const strip = el("div", {className: "similar"});
    for (const s of row.similar) {
      strip.append(el("figure", {title: s.path + " (" + s.label + ", cosine " + s.similarity.toFixed(3) + ")"},
                      el("img", {src: s.thumbnail.replace(/^\\//, ""), alt: s.path}),
                      el("figcaption", {textContent: s.label + " " + s.similarity.toFixed(2)})));
    }
    body.append(strip);
  } else if (answer.similar_unavailable) {
    body.append(el("p", {className: "muted", textContent: "Similar photos unavailable: " + answer.similar_unavailable}));
  }
  card.dataset.state = "done";
}

async function classifyAll(files) {
  for (const file of files) await classify(file);   // one at a time: the server serializes them anyway
}
const input = document.getElementById("files");
input.addEventListener("change", () => { classifyAll([...input.files]); input.value = ""; });
const drop = document.getElementById("drop");
for (const kind of ["dragenter", "dragover"]) drop.addEventListener(kind, e => { e.preventDefault(); drop.classList.add("over"); });
for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, e => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", e => classifyAll([...e.dataTransfer.files]));
</script>
</body></html>
"""


def page(info: dict) -> str:
    """The page, with `info` (ServeState.info) embedded as JSON that no name inside can end early."""
    data = json.dumps(info, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _TEMPLATE.replace("__INFO__", data)
