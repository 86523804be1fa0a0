"""Report sections for `inspect`'s results (near-duplicates, label issues, outliers, class balance,
learning curve, embedding map), rendered from an inspect folder (inspect.json + CSVs).

Used by report.write.write_report when a run directory has an inspect/ folder, and on its own by
`featurepipe inspect` (write_inspect_report). Everything is embedded: thumbnails as data URIs,
the embedding map as inline SVG whose points show the file name (<title>) and a thumbnail on hover.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from featurepipe.core import atomic, csvcells, trust
from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.report.charts import Charts
from featurepipe.report.html import BEST_COLOUR, OTHER_COLOUR, data_uri, esc, html_table, num, render_page
from featurepipe.report.thumbnails import resolve_image, short_path, thumbnail
from featurepipe.rundir.layout import (
    DUPLICATES, EMBEDDING, INSPECT_HTML, INSPECT_JSON, LABEL_SCORES, LEARNING_CURVE, REPORT_DIR, SUSPECTS,
)

S_DUPLICATES = "Near-duplicates and leakage"
S_LABELS = "Label issues"
S_OUTLIERS = "Outliers"
S_BALANCE = "Class balance"
S_CURVE = "Learning curve"
S_MAP = "Embedding map"
SECTIONS = (S_DUPLICATES, S_LABELS, S_OUTLIERS, S_BALANCE, S_CURVE, S_MAP)

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d", "#ff9da6",
           "#bab0ac")
MAP_THUMBS = 400          # points of the embedding map that get a hover thumbnail (the file stays small)
MAP_THUMB_PX = 96
PAIRS_SHOWN = 30
TOP_SUSPECTS = 15         # label suspects in the gallery (at most --thumbnails)
OUTLIERS_SHOWN = 8


def _read_frame(path: Path) -> Optional[pd.DataFrame]:
    if not path.exists():
        return None
    try:
        return csvcells.read(path, keep_default_na=False, na_values=[""],
                           dtype={c: str for c in ("path", "path_a", "path_b", "label", "label_a", "label_b", "given",
                                                   "suggested", "closest_other", "predicted", "group")})
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise FeaturepipeError(f"{path}: cannot be read as CSV ({error}); re-run `featurepipe inspect`") from None


def _text(value) -> str:
    """A CSV cell as text: an empty cell (read as NaN) is ""."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _picture(path: str, source: Optional[str], cache: dict) -> str:
    if path not in cache:
        image_path = resolve_image(path, source)
        png = thumbnail(image_path) if image_path is not None else None
        cache[path] = (f'<img src="{data_uri(png)}" alt="{esc(Path(path).name)}">' if png is not None else
                       f'<div class="noimg">no thumbnail<br>({"file not found" if image_path is None else "cannot be decoded"})</div>')
    return cache[path]


def _small_thumb(path: str, source: Optional[str]) -> Optional[str]:
    """A JPEG data URI MAP_THUMB_PX wide, for hover thumbnails (JPEG: ~4x smaller than PNG)."""
    from PIL import Image, ImageOps

    image_path = resolve_image(path, source)
    if image_path is None:
        return None
    try:
        with Image.open(image_path) as image:
            image.draft("RGB", (MAP_THUMB_PX * 2, MAP_THUMB_PX * 2))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((MAP_THUMB_PX, MAP_THUMB_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except Exception:   # any decoder failure: the point keeps its <title>, without a picture
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(picture: str, caption: str, klass: str = "miss", data: str = "") -> str:
    return (f'<figure class="{klass}"{data}><div class="thumb">{picture}</div>'
            f'<figcaption>{caption}</figcaption></figure>')


# ------------------------------------------------------------------------------------ sections


def _duplicates_section(summary: dict, pairs: Optional[pd.DataFrame], source, thumbs: dict) -> str:
    info = summary.get("duplicates") or {}
    if pairs is None:
        return f'<p class="note">{DUPLICATES} is missing.</p>'
    rule = (f'Copies: same file content, or feature cosine ≥ {num(info.get("cosine_threshold"), 2)}, or perceptual-hash '
            f'distance ≤ {esc(info.get("hamming_threshold"))} bits (whole image vs its central 90%/80% and off-centre trims), '
            f'or both moderately close and each other\'s nearest neighbour. Overridable with <code>--dedup-cosine</code> / <code>--dedup-hamming</code>.')
    if pairs.empty:
        return f'<p>No near-duplicates found among {esc(summary.get("images", "the"))} images.</p><p class="note">{rule}</p>'
    folds, leaked = info.get("folds", 0), info.get("leaked_folds", 0)
    leaking = info.get("pairs_leaking", 0)
    leak = (f'Without duplicate groups, <b>{leaked} of {folds} folds</b> would have had a copy of a validation image '
            f'in training ({leaking} of {len(pairs)} pair(s) split between folds). ' if folds else "")
    parts = [f'<p class="sub">{len(pairs)} pair(s) in {info.get("clusters", 0)} group(s) of copies '
             f'({info.get("images_in_clusters", 0)} images). {leak}<code>featurepipe run</code> and '
             f'<code>evaluate</code> keep each group in one fold (<code>--no-dedup-groups</code> turns it off). '
             f'Cross-class copies (marked) are likely label errors.</p><p class="note">{rule}</p>']
    shown = pairs.sort_values(["cross_class", "cosine"], ascending=[False, False]).head(PAIRS_SHOWN)
    rows = []
    for r in shown.to_dict("records"):
        cross = ' <span class="flag">different labels</span>' if str(r.get("cross_class")) in ("True", "true", "1") else ""
        ham = "–" if int(r.get("hamming", -1)) < 0 else str(int(r["hamming"]))
        rows.append([f'<div class="pair">{_picture(r["path_a"], source, thumbs)}{_picture(r["path_b"], source, thumbs)}</div>',
                     f'<span class="path">{esc(short_path(r["path_a"], source))}</span> ({esc(r["label_a"])}, {esc(r["split_a"])})'
                     f'<br><span class="path">{esc(short_path(r["path_b"], source))}</span> ({esc(r["label_b"])}, '
                     f'{esc(r["split_b"])}){cross}',
                     num(r["cosine"]), ham, esc(r["evidence"])])
    parts.append(html_table(["images", "files", "cosine", "pHash bits", "evidence"], rows, numeric={2, 3}, cls="dups"))
    if len(pairs) > len(shown):
        parts.append(f'<p class="note">{len(pairs) - len(shown)} more pair(s) in {DUPLICATES}.</p>')
    return "".join(parts)


def _labels_section(summary: dict, suspects: Optional[pd.DataFrame], source, limit: int, thumbs: dict,
                    progress) -> str:
    notes = summary.get("notes") or {}
    if "label_issues" in notes or suspects is None or "margin" not in suspects.columns:
        return f'<p>Not computed: {esc(notes.get("label_issues", f"{LABEL_SCORES} is missing"))}.</p>'
    info = summary.get("label_issues") or {}
    shown = suspects.head(max(0, limit))
    figures = []
    for n, r in enumerate(shown.to_dict("records"), 1):
        report(progress, "thumbnails", n, len(shown), Path(r["path"]).name)
        flagged = str(r.get("flagged")) in ("True", "true", "1")
        flag = ' <span class="flag">confident</span>' if flagged else ""
        # Red "suggested" only where the row is flagged: an unflagged row's closest other class is no
        # suggestion (suspects.csv leaves its suggested cell empty), and a red label would read as one.
        suggested = _text(r.get("suggested"))
        other = _text(r.get("closest_other")) or suggested
        verdict = (f'<span class="lab pred">suggested: {esc(suggested or other)}</span>' if flagged else
                   f'<span class="muted other">closest other class: {esc(other)}</span>')
        caption = (f'<span class="lab">#{int(r["rank"])}</span>{flag}<br>'
                   f'<span class="lab true">given: {esc(r["given"])}</span><br>'
                   f'{verdict}<br>'
                   f'<span class="muted">p(given)={num(r["self_confidence"])} · margin={num(r["margin"])}</span>'
                   f'<span class="path" title="{esc(r["path"])}">{esc(short_path(r["path"], source))}</span>')
        figures.append(_figure(_picture(r["path"], source, thumbs), caption, "miss suspect",
                               f' data-margin="{float(r["margin"]):.6f}"'))
    message = f'<p class="message">{esc(info["message"])}</p>' if info.get("message") else ""
    suspects_note = (summary.get("suspects") or {}).get("message")
    if suspects_note:
        message += f'<p class="message">{esc(suspects_note)}</p>'
    return (message + f'<p class="sub">Out-of-fold probabilities from {esc(summary.get("label_source", "?"))}. Ranked by '
            f'normalized margin p(given) − max p(other), lowest first; "confident" marks images whose suggested '
            f'class reaches that class\'s own average confidence (confident learning): {info.get("flagged", 0)} '
            f'image(s), {info.get("misclassified", 0)} misclassified in all.</p>'
            f'<div class="gallery">{"".join(figures)}</div>'
            f'<p class="note">To act on them: edit <code>{SUSPECTS}</code> in the inspect folder (keep the rows you '
            f'agree with) and pass it back, <code>featurepipe run DATA --exclude {SUSPECTS}</code> to leave images '
            'out, or <code>--relabel fixes.csv</code> (columns path,label; the <code>suggested</code> column is used '
            'when there is no label column). Features are reused; only the CV folds are refitted.</p>')


def _outliers_section(summary: dict, suspects: Optional[pd.DataFrame], source, thumbs: dict) -> str:
    info = summary.get("outliers")
    if not info or suspects is None or "outlier_score" not in suspects.columns:
        return '<p>Not computed: too few images with features.</p>'
    top = suspects.sort_values("outlier_score", ascending=False).head(OUTLIERS_SHOWN)
    figures = [_figure(_picture(r["path"], source, thumbs),
                       f'<span class="lab">{esc(r["given"])}</span>'
                       + (' <span class="flag">outlier</span>' if str(r.get("outlier")) in ("True", "true", "1") else "")
                       + f'<br><span class="muted">kNN distance {num(r["outlier_score"])}</span>'
                       f'<span class="path" title="{esc(r["path"])}">{esc(short_path(r["path"], source))}</span>')
               for r in top.to_dict("records")]
    flagged = int(info.get("flagged", 0) or 0)
    message = f'<p class="message">{esc(info["message"])}</p>' if info.get("message") else ""
    # With no outlier, the gallery is only the farthest images, and says so: "the 8 farthest" read as 8 outliers.
    caption = (f'the {len(top)} farthest (none is an outlier)' if flagged == 0 else
               f'the {len(top)} farthest ({flagged} above the line, marked "outlier")')
    return (message + f'<p class="sub">Mean cosine distance to the {info.get("neighbours")} nearest other images in '
            f'feature space (copies excluded). {flagged} image(s) above the outlier line '
            f'{num(info.get("threshold"))} (Q3 + 3 IQR). Outliers are often off-topic, corrupt-looking or unusually '
            f'framed photos.</p><h3 class="caption">{esc(caption)}</h3><div class="gallery">{"".join(figures)}</div>')


def _balance_section(summary: dict, failed_listed_elsewhere: bool) -> str:
    info = summary.get("balance") or {}
    counts = info.get("counts") or {}
    if not counts:
        return "<p>No training images.</p>"
    total = max(1, max(counts.values()))
    rows = [[esc(c), str(n), f'<span style="display:inline-block;height:9px;width:{int(160 * n / total)}px;'
                            f'background:{OTHER_COLOUR};border-radius:2px"></span>'] for c, n in counts.items()]
    verdict = (f'<b>Imbalanced</b>: the largest class has {num(info.get("ratio"), 1)}× the images of the smallest '
               f'(above {num(info.get("threshold"), 1)}×). Accuracy then favours the big classes; read balanced '
               f'accuracy and per-class recall, try <code>--grid \'{{"logreg": {{"class_weight": ["balanced"]}}}}\'</code>, '
               f'or add photos to the small classes.' if info.get("imbalanced") else
               f'Balanced enough: the largest class has {num(info.get("ratio"), 2)}× the images of the smallest.')
    out = f"<p>{verdict}</p>" + html_table(["class", "training images", ""], rows, numeric={1})
    failed = summary.get("failed") or []
    if failed and not failed_listed_elsewhere:
        out += (f"<h3>Images in no analysis ({len(failed)})</h3><p class=\"note\">They could not be decoded, so they "
                f"have no features.</p>" + html_table(["path", "reason"], [[f'<span class="path">{esc(f["path"])}</span>',
                                                                            esc(f["reason"])] for f in failed]))
    return out


def _curve_section(summary: dict, charts: Charts, points: Optional[pd.DataFrame]) -> str:
    notes = summary.get("notes") or {}
    info = summary.get("learning_curve")
    if info and info.get("reading") and (points is None or points.empty):
        # No curve points is the far end of "too few images to tell": say that, not "Not computed".
        return f'<p><b>Reading:</b> {esc(info["reading"])}.</p>'
    if not info or points is None or points.empty:
        return f'<p>Not computed: {esc(notes.get("learning_curve", f"{LEARNING_CURVE} is missing"))}.</p>'
    fig, ax = charts.figure(7.5, 3.6)
    x = points["images_per_class"].to_numpy(dtype=float)
    y = points["accuracy_mean"].to_numpy(dtype=float)
    err = np.nan_to_num(points["accuracy_sem"].to_numpy(dtype=float))
    ax.errorbar(x, y, yerr=1.96 * err, marker="o", color=OTHER_COLOUR, ecolor="#555555", capsize=3, linewidth=1.8)
    ax.scatter(x[-1:], y[-1:], color=BEST_COLOUR, zorder=3, s=50, label="all training images of a fold")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in points["label"]])
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(max(0.0, float(np.nanmin(y - 2 * err)) - 0.05), 1.0)
    ax.grid(color="#e5e5e5", linewidth=0.8)
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    image = charts.save(fig, "learning_curve.png", "learning curve: accuracy against images per class")
    rows = [[esc(r["label"]), num(r["accuracy_mean"]), num(r["accuracy_sem"]), str(int(r["fits"]))]
            for r in points.to_dict("records")]
    return (f'<p><b>Reading:</b> {esc(info.get("reading", ""))}.</p>'
            f'<p class="sub">{esc(info.get("head", ""))}{esc(" — " + info["head_source"] if info.get("head_source") else "")} fitted on n random training images per class of each CV fold '
            f'({info.get("draws")} draws per fold and size), scored on the fold\'s whole validation part; whiskers: '
            f'95% interval of the mean.</p>' + image
            + html_table(["images per class", "accuracy", "std. error", "fits"], rows, numeric={1, 2, 3}))


def _svg_map(frame: pd.DataFrame, xcol: str, ycol: str, classes: list[str], title: str, thumb_ids: dict) -> str:
    width, height, pad = 520, 420, 18
    x, y = frame[xcol].to_numpy(dtype=float), frame[ycol].to_numpy(dtype=float)
    def scale(v, lo, hi, size):
        span = (hi - lo) or 1.0
        return pad + (v - lo) / span * (size - 2 * pad)
    sx = scale(x, x.min(), x.max(), width)
    sy = height - scale(y, y.min(), y.max(), height)
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}
    points = []
    for i, r in enumerate(frame.to_dict("records")):
        suspect = str(r.get("suspect")) in ("True", "true", "1")
        wrong = str(r.get("misclassified")) in ("True", "true", "1")
        marks = ", ".join(m for m, on in (("misclassified", wrong), ("label suspect", suspect)) if on)
        tip = f'{Path(r["path"]).name} · {r["label"]}' + (f" · {marks}" if marks else "")
        stroke = ' stroke="#111" stroke-width="2"' if wrong else ' stroke="#fff" stroke-width="0.8"'
        ring = (f'<circle cx="{sx[i]:.1f}" cy="{sy[i]:.1f}" r="9" fill="none" stroke="#cf222e" stroke-width="2"/>'
                if suspect else "")
        thumb = ""
        if r["path"] in thumb_ids:
            tx = min(sx[i] + 8, width - MAP_THUMB_PX - 2)
            ty = max(2, min(sy[i] - MAP_THUMB_PX - 8, height - MAP_THUMB_PX - 2))
            thumb = f'<use class="th" href="#{thumb_ids[r["path"]]}" x="{tx:.1f}" y="{ty:.1f}"/>'
        points.append(f'<g class="pt" data-path="{esc(r["path"])}"><title>{esc(tip)}</title>{ring}'
                      f'<circle cx="{sx[i]:.1f}" cy="{sy[i]:.1f}" r="5" fill="{colour.get(r["label"], "#999")}"{stroke}/>'
                      f'{thumb}</g>')
    return (f'<figure class="map"><svg class="emap" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fbfcfd" stroke="#d8dee4"/>'
            f'{"".join(points)}</svg><figcaption>{esc(title)}</figcaption></figure>')


MAP_SCRIPT = ("<script>document.querySelectorAll('svg.emap g.pt').forEach(function(g){"
              "g.addEventListener('mouseenter',function(){g.parentNode.appendChild(g);});});</script>")


def _map_section(summary: dict, frame: Optional[pd.DataFrame], classes: list[str], source) -> str:
    notes = summary.get("notes") or {}
    info = summary.get("embedding")
    if not info or frame is None or frame.empty:
        return f'<p>Not computed: {esc(notes.get("embedding", f"{EMBEDDING} is missing"))}.</p>'
    thumb_ids, defs = {}, []
    for n, path in enumerate(frame["path"].head(MAP_THUMBS)):
        uri = _small_thumb(path, source)
        if uri is not None:
            thumb_ids[path] = f"fp-map-thumb-{n}"
            defs.append(f'<image id="fp-map-thumb-{n}" href="{uri}" width="{MAP_THUMB_PX}" height="{MAP_THUMB_PX}" '
                        f'preserveAspectRatio="xMidYMid meet"/>')
    maps = []
    variance = info.get("pca_variance") or [float("nan")] * 2
    maps.append(_svg_map(frame, "pca_x", "pca_y", classes,
                         f"PCA (axes explain {num(variance[0] * 100, 1)}% and {num(variance[1] * 100, 1)}% of the variance)",
                         thumb_ids))
    if "tsne_x" in frame.columns and frame["tsne_x"].notna().all():
        maps.append(_svg_map(frame, "tsne_x", "tsne_y", classes, "t-SNE (cosine; distances between clusters mean little)",
                             thumb_ids))
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{esc(c)}</span>'
                     for i, c in enumerate(classes))
    legend += ('<span class="key"><i style="background:#fff;border:2px solid #111"></i>misclassified (out of fold)</span>'
               '<span class="key"><i style="background:#fff;border:2px solid #cf222e;border-radius:50%"></i>'
               'label suspect</span>')
    note = f' {esc(info["note"])}.' if info.get("note") else ""
    more = (f' Hover thumbnails for the first {MAP_THUMBS} points.' if len(frame) > MAP_THUMBS else "")
    return (f'<p class="sub">Every training image\'s cached features in two dimensions, coloured by its given label. '
            f'Hover a point for its file name and thumbnail.{note}{more} Points deep inside another class\'s cluster '
            f'are worth a look.</p><div class="legend">{legend}</div>'
            f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>{"".join(defs)}</defs></svg>'
            f'<div class="maps">{"".join(maps)}</div>{MAP_SCRIPT}')


CSS = """
table.dups .pair { display: flex; gap: 4px; }
table.dups .pair img { max-width: 96px; max-height: 96px; }
table.dups .pair .noimg { font-size: 11px; color: var(--muted); width: 96px; }
.flag { background: #ffebe9; color: #cf222e; border-radius: 4px; padding: 0 5px; font-size: 11px; font-weight: 600; }
.maps { display: flex; flex-wrap: wrap; gap: 14px; }
figure.map { margin: 0; max-width: 100%; } figure.map figcaption { font-size: 12px; color: var(--muted); }
svg.emap { max-width: 100%; height: auto; }   /* scales by its viewBox: a phone shows the whole map */
svg.emap .th { display: none; pointer-events: none; }
svg.emap g.pt:hover .th { display: inline; }
svg.emap g.pt:hover circle { stroke: #000; stroke-width: 2.5; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; margin: 6px 0; }
.legend .key i { display: inline-block; width: 11px; height: 11px; border-radius: 50%; margin-right: 5px;
                 vertical-align: -1px; }
"""


def inspect_sections(inspect_dir: Path, charts: Charts, source: Optional[str] = None, thumbnails: int = 24,
                     progress: Optional[ProgressCallback] = None, failed_listed_elsewhere: bool = False,
                     run_dir: Optional[Path] = None) -> list[tuple[str, str]]:
    """(title, html) of every inspect section, each explained instead of left out when it could not be computed.

    With `run_dir`, results computed from an earlier evaluation of that run directory are marked stale.
    """
    inspect_dir = Path(inspect_dir)
    try:
        summary = json.loads((inspect_dir / INSPECT_JSON).read_text())
    except (OSError, ValueError) as error:
        raise FeaturepipeError(f"{inspect_dir / INSPECT_JSON}: cannot be read ({error}); "
                               f"re-run `featurepipe inspect`") from None
    source = source or summary.get("source")
    classes = [str(c) for c in summary.get("classes") or []]
    suspects = _read_frame(inspect_dir / LABEL_SCORES)
    thumbs: dict = {}
    sections = [
        (S_DUPLICATES, _duplicates_section(summary, _read_frame(inspect_dir / DUPLICATES), source, thumbs)),
        (S_LABELS, _labels_section(summary, suspects, source, min(thumbnails, TOP_SUSPECTS), thumbs, progress)),
        (S_OUTLIERS, _outliers_section(summary, suspects, source, thumbs)),
        (S_BALANCE, _balance_section(summary, failed_listed_elsewhere)),
        (S_CURVE, _curve_section(summary, charts, _read_frame(inspect_dir / LEARNING_CURVE))),
        (S_MAP, _map_section(summary, _read_frame(inspect_dir / EMBEDDING), classes, source)),
    ]
    stale = ""
    identity = summary.get("label_source_identity") or ""
    if run_dir is not None and identity.startswith("run:"):
        from featurepipe.inspection.inspect import oof_from_run

        try:
            current = oof_from_run(run_dir).identity
        except FeaturepipeError:
            current = None
        if current != identity:
            stale = ('<p class="flag stale">These results were computed from an earlier evaluation written to this '
                     'run directory; re-run <code>featurepipe inspect DATA --run-dir RUN</code> to refresh them.</p>')
    sections[0] = (sections[0][0], f"<style>{CSS}</style>" + stale + sections[0][1])
    return sections


def write_inspect_report(inspect_dir: Path, thumbnails: int = 24, progress: Optional[ProgressCallback] = None) -> Path:
    """INSPECT_DIR/inspect.html, self-contained, with the learning-curve PNG also in INSPECT_DIR/report/."""
    inspect_dir = Path(inspect_dir)
    summary = json.loads((inspect_dir / INSPECT_JSON).read_text())
    charts = Charts(trust.writable(inspect_dir, REPORT_DIR, folder=True))
    sections = inspect_sections(inspect_dir, charts, summary.get("source"), thumbnails, progress)
    config = {"dataset": {"source": summary.get("source")}, "backbone": summary.get("backbone") or {}}
    page = render_page(config, inspect_dir, sections, []).replace("featurepipe report:", "featurepipe inspect:")
    path = trust.writable(inspect_dir, INSPECT_HTML)
    atomic.write_text(path, page)
    return path
