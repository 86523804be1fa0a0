"""Stage `report`: one self-contained HTML page (plus its PNG charts) describing an evaluate run.

Reads what `featurepipe evaluate` wrote in a run directory (leaderboard.csv, folds.csv,
oof_predictions.csv, holdout.csv, best_head.json, config.json) and, when present, what fine-tuning
wrote (finetune/, baseline/, best_head_history.csv). Writes RUN_DIR/report.html, where every chart
and thumbnail is embedded as a base64 data URI so the file can be mailed or archived on its own,
and the same charts as PNG files in RUN_DIR/report/.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from featurepipe.core import atomic, trust
from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.rundir.folder import read_json
from featurepipe.rundir.run import (
    BASELINE_DIR, CONFIG, FINETUNE_DIR, FOLDS, HEAD_HISTORY, HEAD_META, HOLDOUT, LEADERBOARD, NESTED, OOF,
)

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "f1_macro": "macro F1",
                 "log_loss": "log loss", "roc_auc": "ROC AUC"}
# Columns that hold names, never numbers: read them as text so a class called "NA" or "1" survives.
TEXT_COLUMNS = ("head", "params", "augment", "path", "true", "pred", "split", "phase", "stage")
THUMB_PX = 128
BEST_COLOUR = "#e8730c"
OTHER_COLOUR = "#4c78a8"

S_RUN = "Run"
S_NESTED = "Nested cross-validation"
S_LEADERBOARD = "Leaderboard"
S_FOLDS = "Fold scores"
S_CONFUSION = "Confusion matrix"
S_PER_CLASS = "Per-class precision and recall"
S_MISTAKES = "Misclassified images"
S_HOLDOUT = "Holdout scores"
S_FINETUNE = "Fine-tuning"
S_BASELINE = "Baseline trained from scratch"
S_DENSE = "Dense head training"
S_REPRODUCE = "Reproduce"

OPTIONAL_INPUTS = (CONFIG, FOLDS, OOF, HEAD_META, HOLDOUT, f"{FINETUNE_DIR}/history.csv",
                   f"{FINETUNE_DIR}/summary.json", f"{BASELINE_DIR}/history.csv", f"{BASELINE_DIR}/summary.json",
                   HEAD_HISTORY)


@dataclass
class ReportResult:
    html_path: Path
    png_paths: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)   # headings of the sections written, in order
    missing: list[str] = field(default_factory=list)    # optional inputs (relative to the run dir) that were absent

    def to_dict(self) -> dict:
        return {"html": str(self.html_path), "pngs": [str(p) for p in self.png_paths],
                "sections": self.sections, "missing": self.missing}


# --------------------------------------------------------------------------------------------- reading


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        # Only empty cells are missing values: "NA", "None" or "null" may well be class names.
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""],
                            dtype={c: str for c in TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise FeaturepipeError(f"{path}: cannot be read as CSV ({error}); re-run `featurepipe evaluate`") from None
    for column in TEXT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].fillna("")
    return frame


def _canonical_params(params: Any) -> str:
    """One spelling per parameter set, whether it comes as a dict or as a JSON string."""
    if isinstance(params, str):
        text = params.strip()
        if not text:
            return "{}"
        try:
            params = json.loads(text)
        except ValueError:
            return text
    if params is None:
        params = {}
    return json.dumps(params, sort_keys=True)


def _config_key(head: str, params: Any, augment: str) -> tuple[str, str, str]:
    return str(head), _canonical_params(params), str(augment or "none")


def _with_key(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    if "params" not in frame.columns:
        frame["params"] = "{}"
    if "augment" not in frame.columns:
        frame["augment"] = "none"
    heads = frame["head"].astype(str)
    if "features" in frame.columns:
        # A searched run compares the same head on several feature sets: the feature set is part of the name.
        heads = frame["features"].fillna("").astype(str).str.cat(heads, sep=" ").str.strip()
    frame["_key"] = [_config_key(h, p, a) for h, p, a in zip(heads, frame["params"], frame["augment"])]
    return frame


def _params_text(params: Any) -> str:
    canonical = _canonical_params(params)
    try:
        parsed = json.loads(canonical)
    except ValueError:
        return canonical
    if isinstance(parsed, dict) and isinstance(parsed.get("members"), list):
        # An ensemble: its members as head(key=value), not its JSON.
        # A vote across feature sets names each member's feature set too.
        return " + ".join(f"{(str(m['features']) + ' ') if m.get('features') else ''}{m.get('head')}"
                          f"({_params_text(m.get('params') or {})})" for m in parsed["members"]
                          if isinstance(m, dict))
    if isinstance(parsed, dict):
        return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in parsed.items())
    return canonical


def _config_label(key: tuple[str, str, str]) -> str:
    head, params, augment = key
    text = head
    params = _params_text(params)
    if params:
        text += f" ({params})"
    if augment and augment != "none":
        text += f" +{augment}"
    return text


# ------------------------------------------------------------------------------------------ formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _e(value) if value not in (None, "") else "–"
    if math.isnan(number):
        return "–"
    if number.is_integer() and abs(number) < 1e15 and digits == 0:
        return str(int(number))
    return f"{number:.{digits}f}"


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return _e(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else _num(value, 4)
    return _e(value)


def _table(columns: list[str], rows: list[list[str]], numeric: Optional[set[int]] = None, cls: str = "",
           row_classes: Optional[list[str]] = None) -> str:
    """rows hold ready-escaped HTML; `numeric` are column indexes to right-align."""
    numeric = numeric or set()
    head = "".join(f'<th class="num">{_e(c)}</th>' if i in numeric else f"<th>{_e(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for r, row in enumerate(rows):
        klass = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td class="num">{v}</td>' if i in numeric else f"<td>{v}</td>" for i, v in enumerate(row))
        body.append(f"<tr{klass}>{cells}</tr>")
    klass = f' class="{cls}"' if cls else ""
    return f'<div class="scroll"><table{klass}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------- charts


# Bump when a chart's drawing code changes: cached PNGs of the old drawing are then never reused.
CHART_CACHE_VERSION = 1
CHART_CACHE_FILES = 256          # PNGs kept in a cache's report-charts/ (the newest; the rest are removed)
_CHART_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


class _Charts:
    """Saves matplotlib figures as PNG files in RUN_DIR/report/ and hands back <img> tags.

    With `cache` (a folder in the cache root `run` was given, never one read from a run's files), a
    chart drawn from the same data as before is copied instead of drawn again: drawing the report's
    charts was ~1 s of a ~4 s no-change re-run of `run` (see _cached_chart)."""

    def __init__(self, directory: Path, cache: Optional[Path] = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.directory = directory
        self.paths: list[Path] = []
        self.cache = cache
        self.pending: Optional[str] = None     # the cache key of the chart being drawn
        directory.mkdir(parents=True, exist_ok=True)

    def reuse(self, key: str) -> Optional[str]:
        """The <img> tag of the chart cached under `key` (copied into the run), None if there is none."""
        if self.cache is None:
            return None
        try:
            record = json.loads((self.cache / f"{key}.json").read_text())
            png = (self.cache / f"{key}.png").read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        name, alt = record.get("name"), record.get("alt")
        # Only a plain PNG file name, and bytes signed with this user's key (featurepipe.core.trust, as the
        # refit cache does), are taken: a hash written beside the file would guard nothing.
        if not (isinstance(name, str) and _CHART_FILE.match(name) and isinstance(alt, str)
                and trust.signed(f"{key}.png", hashlib.sha256(png).hexdigest(), record.get("hmac"))):
            return None
        return self._keep(png, name, alt)

    def _remember(self, key: str, png: bytes, name: str, alt: str) -> None:
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(self.cache / f"{key}.png", png)
            mac = trust.sign(f"{key}.png", hashlib.sha256(png).hexdigest())
            atomic.write_json(self.cache / f"{key}.json", {"name": name, "alt": alt, "hmac": mac})
            kept = sorted(self.cache.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in kept[CHART_CACHE_FILES:]:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
        except OSError:
            pass   # a cache that cannot be written only means drawing again next time

    def _keep(self, png: bytes, name: str, alt: str) -> str:
        path = self.directory / name
        atomic.write_bytes(path, png)
        self.paths.append(path)
        return f'<img class="chart" src="{_data_uri(png)}" alt="{_e(alt)}">'

    def figure(self, width: float, height: float):
        fig, ax = self.plt.subplots(figsize=(width, height))
        return fig, ax

    def save(self, fig, name: str, alt: str) -> str:
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
        finally:
            self.plt.close(fig)
        png = buffer.getvalue()
        if self.cache is not None and self.pending is not None:
            self._remember(self.pending, png, name, alt)
        return self._keep(png, name, alt)


def _chart_key(draw: str, args: tuple, kwargs: dict) -> str:
    """What a chart is drawn from: the drawing function, its code version, matplotlib's and the data."""
    import matplotlib

    from featurepipe.core.digest import digest

    return digest(draw, CHART_CACHE_VERSION, matplotlib.__version__, *args, sorted(kwargs.items()))[:40]


def _cached_chart(draw):
    """Reuse the PNG of a chart drawn earlier from the same data (when the _Charts has a cache)."""
    @functools.wraps(draw)
    def wrapper(charts: _Charts, *args, **kwargs):
        if charts.cache is None:
            return draw(charts, *args, **kwargs)
        key = _chart_key(draw.__name__, args, kwargs)
        reused = charts.reuse(key)
        if reused is not None:
            return reused
        charts.pending = key
        try:
            return draw(charts, *args, **kwargs)
        finally:
            charts.pending = None
    return wrapper


def _plain(text: str) -> str:
    """Text for a matplotlib label: a "$" would otherwise start mathtext (and can fail to render)."""
    return str(text).replace("$", r"\$")


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


CHART_LABEL_CHARS = 64


def _chart_label(key) -> str:
    """A configuration's y-axis label, cut to CHART_LABEL_CHARS: a vote's label lists every member (~600
    characters for `run`'s nine), which made the charts ~3,700 px wide with the bars squeezed to the
    right and cost ~0.4 s of rendering; the table below each chart keeps the whole label."""
    label = _config_label(key)
    if len(label) > CHART_LABEL_CHARS:
        label = label[:CHART_LABEL_CHARS - 1].rstrip() + "\u2026"
    return _plain(label)


@_cached_chart
def _leaderboard_chart(charts: _Charts, board: pd.DataFrame, best_key, limit: int = 40) -> str:
    shown = board.head(limit)
    labels = [_chart_label(k) for k in shown["_key"]]
    means = shown["accuracy_mean"].to_numpy(dtype=float)
    n = len(shown)
    fig, ax = charts.figure(9.0, 0.38 * n + 1.3)
    y = np.arange(n)
    colours = [BEST_COLOUR if k == best_key else OTHER_COLOUR for k in shown["_key"]]
    ax.barh(y, np.nan_to_num(means), color=colours, height=0.65)
    if {"accuracy_ci_low", "accuracy_ci_high"} <= set(shown.columns):
        low = np.clip(means - shown["accuracy_ci_low"].to_numpy(dtype=float), 0, None)
        high = np.clip(shown["accuracy_ci_high"].to_numpy(dtype=float) - means, 0, None)
        ax.errorbar(np.nan_to_num(means), y, xerr=[np.nan_to_num(low), np.nan_to_num(high)], fmt="none",
                    ecolor="#333333", elinewidth=1.2, capsize=3)
    for yi, mean in zip(y, means):
        if not math.isnan(mean):
            ax.text(0.005, yi, f"{mean:.3f}", va="center", ha="left", color="white", fontsize=8, fontweight="bold")
    ax.set_yticks(y, labels, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("cross-validated accuracy (bars: mean over folds, whiskers: 95% interval)")
    _style(ax)
    return charts.save(fig, "leaderboard.png", "leaderboard: accuracy per head with 95% intervals")


@_cached_chart
def _folds_chart(charts: _Charts, folds: pd.DataFrame, order: list, best_key) -> str:
    data = [folds.loc[folds["_key"] == key, "accuracy"].dropna().to_numpy(dtype=float) for key in order]
    labels = [_chart_label(k) for k in order]
    n = len(order)
    fig, ax = charts.figure(9.0, 0.42 * n + 1.3)
    y = np.arange(n)
    box = ax.boxplot([d if len(d) else [np.nan] for d in data], positions=y, vert=False, widths=0.55,
                     patch_artist=True, showfliers=False, medianprops={"color": "#222222"})
    for patch, key in zip(box["boxes"], order):
        patch.set_facecolor(BEST_COLOUR if key == best_key else OTHER_COLOUR)
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)
    for yi, values, key in zip(y, data, order):
        jitter = rng.uniform(-0.15, 0.15, len(values))
        ax.scatter(values, yi + jitter, s=16, zorder=3, color=BEST_COLOUR if key == best_key else OTHER_COLOUR,
                   edgecolors="white", linewidths=0.5)
    ax.set_yticks(y, labels, fontsize=8.5)
    ax.invert_yaxis()
    low = min((d.min() for d in data if len(d)), default=0.0)
    ax.set_xlim(max(0.0, low - 0.05), 1.0 + 0.01)
    ax.set_xlabel("accuracy of each validation fold (dots), box: quartiles")
    _style(ax)
    return charts.save(fig, "folds.png", "accuracy of every fold per head")


@_cached_chart
def _confusion_chart(charts: _Charts, counts: np.ndarray, classes: list[str]) -> str:
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    k = len(classes)
    side = min(9.0, max(3.8, 0.5 * k + 2.4))
    fig, ax = charts.figure(side + 1.0, side)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=9 if k <= 12 else 6,
                        color="white" if shares[i, j] > 0.6 else "#222222")
    # Long class names collide even with few classes: tilt whenever any name is long.
    tilt = k > 4 or max(len(str(c)) for c in classes) > 8
    ax.set_xticks(range(k), [_plain(c) for c in classes], rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8.5)
    ax.set_yticks(range(k), [_plain(c) for c in classes], fontsize=8.5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return charts.save(fig, "confusion.png", "confusion matrix of the best head")


@_cached_chart
def _per_class_chart(charts: _Charts, stats: pd.DataFrame) -> str:
    k = len(stats)
    fig, ax = charts.figure(9.0, 0.45 * k + 1.4)
    y = np.arange(k)
    ax.barh(y - 0.2, stats["precision"], height=0.38, color=OTHER_COLOUR, label="precision")
    ax.barh(y + 0.2, stats["recall"], height=0.38, color=BEST_COLOUR, label="recall")
    ax.set_yticks(y, [_plain(c) for c in stats["class"]], fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("out-of-fold precision and recall of the best head")
    ax.legend(loc="lower right", fontsize=8, frameon=False, bbox_to_anchor=(1.0, 1.0), ncol=2)
    _style(ax)
    return charts.save(fig, "per_class.png", "per-class precision and recall")


@_cached_chart
def _curves_chart(charts: _Charts, history: pd.DataFrame, name: str, title: str) -> Optional[str]:
    panels = [(metric, [c for c in (metric, f"val_{metric}") if c in history.columns])
              for metric in ("loss", "accuracy")]
    panels = [(metric, columns) for metric, columns in panels if columns]
    if not panels or history.empty:
        return None
    epochs = history["epoch"].to_numpy() if "epoch" in history.columns else np.arange(1, len(history) + 1)
    fig, axes = charts.plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.2), squeeze=False)
    changes = []
    for column in ("phase", "stage"):
        if column in history.columns:
            values = history[column].tolist()
            changes = [(epochs[i], values[i]) for i in range(1, len(values)) if values[i] != values[i - 1]]
            break
    for ax, (metric, columns) in zip(axes[0], panels):
        for column in columns:
            values = pd.to_numeric(history[column], errors="coerce").to_numpy(dtype=float)
            ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.6,
                    color=OTHER_COLOUR if column == metric else BEST_COLOUR,
                    label="train" if column == metric else "validation")
        for epoch, phase in changes:
            ax.axvline(epoch, color="#999999", linestyle=":", linewidth=1)
            ax.text(epoch, ax.get_ylim()[1], f" {phase}", fontsize=7, va="top", color="#666666")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}", fontsize=10)
        ax.grid(color="#e5e5e5", linewidth=0.8)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return charts.save(fig, name, f"{title} curves")


# -------------------------------------------------------------------------------------------- analysis


def _confusion(oof: pd.DataFrame, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for true, pred in zip(oof["true"], oof["pred"]):
        if true in index and pred in index:
            counts[index[true], index[pred]] += 1
    return counts


def _per_class(counts: np.ndarray, classes: list[str]) -> pd.DataFrame:
    tp = np.diag(counts).astype(float)
    predicted = counts.sum(axis=0).astype(float)
    support = counts.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1,
                         "support": support.astype(int), "predicted": predicted.astype(int)})


@dataclass
class _Mistake:
    path: str
    true: str
    pred: str
    confidence: float      # probability the head gave its (wrong) prediction
    p_true: float          # probability it gave the true class
    wrong: int             # in how many repeats this image was misclassified
    repeats: int


def _mistakes(oof: pd.DataFrame, repeats: int) -> list[_Mistake]:
    wrong = oof[oof["true"] != oof["pred"]]
    found: dict[str, _Mistake] = {}
    for row in wrong.to_dict("records"):
        confidence = row.get(f"p[{row['pred']}]", float("nan"))
        p_true = row.get(f"p[{row['true']}]", float("nan"))
        confidence = float(confidence) if confidence is not None else float("nan")
        previous = found.get(row["path"])
        score = -1.0 if math.isnan(confidence) else confidence
        if previous is None or score > (-1.0 if math.isnan(previous.confidence) else previous.confidence):
            found[row["path"]] = _Mistake(row["path"], row["true"], row["pred"], confidence,
                                          float(p_true) if p_true is not None else float("nan"),
                                          (previous.wrong if previous else 0), repeats)
        found[row["path"]].wrong += 1
    return sorted(found.values(), key=lambda m: (-(m.confidence if not math.isnan(m.confidence) else -1.0), m.path))


def _resolve_image(path: str, source: Optional[str]) -> Optional[Path]:
    """The image file behind an OOF path; relative paths are tried from the cwd and above the dataset."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    if candidate.is_file():
        return candidate
    if source:
        base = Path(source)
        for ancestor in [base, *base.parents]:
            if (ancestor / candidate).is_file():
                return ancestor / candidate
    return None


def _short_path(path: str, source: Optional[str]) -> str:
    """The path relative to the dataset folder when it lies inside it (full path in the tooltip)."""
    if source:
        try:
            return str(Path(path).relative_to(Path(source)))
        except ValueError:
            pass
    return path


def _thumbnail(path: Path) -> Optional[bytes]:
    from featurepipe.core.errors import ImageDecodeError
    from featurepipe.data.images import thumbnail_png

    try:
        return thumbnail_png(path, THUMB_PX)
    except (ImageDecodeError, OSError):   # the gallery lists the path instead of a picture
        return None


# ----------------------------------------------------------------------------------------------- CSS

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
"""


# ---------------------------------------------------------------------------------------------- report


def _section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _reproduce_command(config: dict) -> str:
    """The evaluate command line, one option per line with shell continuations (copy-pasteable)."""
    groups = _reproduce_args(config)
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in group) for group in groups)


def _reproduce_args(config: dict) -> list[list[str]]:
    dataset = config.get("dataset") or {}
    backbone = config.get("backbone") or {}
    args = ["featurepipe", "evaluate", str(dataset.get("source", "DATA"))]
    if backbone.get("name"):
        args += ["--backbone", str(backbone["name"])]
    if backbone.get("weights") not in (None, "imagenet"):
        args += ["--weights", str(backbone["weights"])]
    if backbone.get("layer"):
        args += ["--layer", str(backbone["layer"])]
    if backbone.get("pooling") not in (None, "avg"):
        args += ["--pooling", str(backbone["pooling"])]
    if backbone.get("image_size"):
        args += ["--image-size", str(backbone["image_size"])]
    if backbone.get("resize"):
        args += ["--resize", str(backbone["resize"])]
    if config.get("heads"):
        args += ["--heads", ",".join(str(h) for h in config["heads"])]
    for option in ("folds", "repeats", "seed"):
        if config.get(option) is not None:
            args += [f"--{option}", str(config[option])]
    if config.get("grids"):
        args += ["--grid", json.dumps(config["grids"], separators=(",", ":"))]
    if config.get("augment"):
        args += ["--augment", str(config["augment"])]
        if config.get("augment_seed"):
            args += ["--augment-seed", str(config["augment_seed"])]
    if config.get("tta"):
        args.append("--tta")
    if config.get("cache_dir"):
        args += ["--cache-dir", str(config["cache_dir"])]
    # issue 11: runs from before duplicate grouping (no key) or with it off must not gain it when repeated
    if not (config.get("dedup_groups") or {}).get("enabled", False):
        args.append("--no-dedup-groups")
    for edit in ("exclude", "relabel"):
        if (config.get("edits") or {}).get(edit):
            args += [f"--{edit}", str(config["edits"][edit]["csv"])]
    groups, index = [args[:3]], 3
    while index < len(args):
        takes_value = index + 1 < len(args) and not args[index + 1].startswith("--")
        groups.append(args[index:index + 2] if takes_value else args[index:index + 1])
        index += 2 if takes_value else 1
    return groups


def _summary_block(summary: dict) -> str:
    parts = []
    before, after = summary.get("before"), summary.get("after")
    if isinstance(before, dict) or isinstance(after, dict):
        before, after = before or {}, after or {}
        rows = []
        for metric in list(dict.fromkeys([*before, *after])):
            b, a = before.get(metric), after.get(metric)
            try:
                change = f"{float(a) - float(b):+.3f}"
            except (TypeError, ValueError):
                change = "–"
            rows.append([_e(metric), _num(b), _num(a), change])
        parts.append(_table(["metric", "before", "after", "change"], rows, numeric={1, 2, 3}))
    other = [(k, v) for k, v in summary.items() if k not in ("before", "after")]
    if other:
        pairs = []
        for key, value in other:
            text = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
            text = str(text)
            pairs.append((key, _e(text if len(text) <= 300 else text[:300] + "…")))
        parts.append(_kv_table(pairs))
    return "".join(parts)


def write_report(run_dir: Path, thumbnails: int = 24, progress: Optional[ProgressCallback] = None,
                 chart_cache: Optional[Path] = None) -> ReportResult:
    """Write RUN_DIR/report.html (self-contained) and the charts as PNGs in RUN_DIR/report/.
    `chart_cache`: a folder where charts are kept by what they are drawn from (`run` passes one in its
    cache root), so a re-run whose numbers did not change copies them instead of drawing them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FeaturepipeError(f"run directory {run_dir} does not exist; run `featurepipe evaluate` first "
                               f"(it prints the run directory it wrote)")
    leaderboard_path = run_dir / LEADERBOARD
    if not leaderboard_path.exists():
        raise FeaturepipeError(f"{leaderboard_path} is missing; {run_dir} is not a finished evaluate run. "
                               f"Run `featurepipe evaluate` first and point `featurepipe report` at its run directory")
    board = _read_csv(leaderboard_path)
    needed = {"head", "accuracy_mean"} - set(board.columns)
    if needed:
        raise FeaturepipeError(f"{leaderboard_path} lacks column(s) {', '.join(sorted(needed))}; it was not written "
                               f"by `featurepipe evaluate` (re-run it)")
    if board.empty:
        raise FeaturepipeError(f"{leaderboard_path} has no rows; re-run `featurepipe evaluate`")
    board = _with_key(board)
    missing = [name for name in OPTIONAL_INPUTS if not (run_dir / name).exists()]
    config = read_json(run_dir / CONFIG) if (run_dir / CONFIG).exists() else {}
    best_meta = read_json(run_dir / HEAD_META) if (run_dir / HEAD_META).exists() else {}
    folds = _with_key(_read_csv(run_dir / FOLDS)) if (run_dir / FOLDS).exists() else None
    oof = _with_key(_read_csv(run_dir / OOF)) if (run_dir / OOF).exists() else None
    dataset = config.get("dataset") or {}
    classes = [str(c) for c in (dataset.get("classes") or best_meta.get("classes") or [])]
    if not classes and oof is not None:
        classes = sorted(set(oof["true"]) | set(oof["pred"]))

    if best_meta.get("head"):
        head = f"{best_meta['features']} {best_meta['head']}" if best_meta.get("features") else best_meta["head"]
        best_key = _config_key(head, best_meta.get("params", {}), best_meta.get("augment", "none"))
    else:
        best_key = board["_key"].iloc[0]
    best_rows = board[board["_key"] == best_key]
    best_row = best_rows.iloc[0] if len(best_rows) else None

    charts = _Charts(run_dir / "report", chart_cache)
    sections: list[tuple[str, str]] = []
    steps = 10   # one tick per section below, written or not
    step = 0

    def tick(message: str) -> None:
        nonlocal step
        step += 1
        report(progress, "report", step, steps, message)

    # ---- run header
    tick(S_RUN)
    sections.append((S_RUN, _run_section(config, dataset, best_key, best_row, board)))

    # ---- the headline: nested CV of the whole search
    if (run_dir / NESTED).exists():
        sections.append((S_NESTED, _nested_section(read_json(run_dir / NESTED))))

    # ---- leaderboard
    tick(S_LEADERBOARD)
    sections.append((S_LEADERBOARD, _leaderboard_section(charts, board, best_key)))

    # ---- folds
    tick(S_FOLDS)
    if folds is not None and "accuracy" in folds.columns and not folds.empty:
        sections.append((S_FOLDS, _folds_section(charts, folds, board, best_key)))

    # ---- best head: confusion, per class, mistakes
    best_oof = None
    if oof is not None and {"true", "pred"} <= set(oof.columns):
        best_oof = oof[oof["_key"] == best_key]
        if best_oof.empty:
            best_oof = None
    repeats = int(best_oof["repeat"].nunique()) if best_oof is not None and "repeat" in best_oof.columns else 1
    best_name = _config_label(best_key)
    tick(S_CONFUSION)
    if best_oof is not None and classes:
        counts = _confusion(best_oof, classes)
        sections.append((S_CONFUSION, _confusion_section(charts, counts, classes, best_name, repeats)))
        tick(S_PER_CLASS)
        sections.append((S_PER_CLASS, _per_class_section(charts, counts, classes, best_name, repeats)))
        tick(S_MISTAKES)
        sections.append((S_MISTAKES, _mistakes_section(best_oof, repeats, thumbnails, dataset.get("source"),
                                                       best_name, progress)))
    else:
        tick(S_PER_CLASS)
        tick(S_MISTAKES)

    # ---- holdout
    tick(S_HOLDOUT)
    if (run_dir / HOLDOUT).exists():
        sections.append((S_HOLDOUT, _holdout_section(_read_csv(run_dir / HOLDOUT), best_name)))

    # ---- fine-tuning, baseline, dense head curves
    tick(S_FINETUNE)
    finetune = _finetune_section(charts, run_dir / "finetune", dataset.get("source"))
    baseline = _training_section(charts, run_dir / "baseline", "baseline_curves.png", "baseline")
    if finetune:
        sections.append((S_FINETUNE, finetune + _comparison(run_dir, best_row)))
    if baseline:
        sections.append((S_BASELINE, baseline))
    tick(S_DENSE)
    if (run_dir / HEAD_HISTORY).exists():
        history = _read_csv(run_dir / HEAD_HISTORY)
        image = _curves_chart(charts, history, "dense_curves.png", "dense head")
        if image:
            sections.append((S_DENSE, '<p class="sub">Training curve of the dense head refit on the whole '
                                      'training split (validation: its early-stopping hold-out).</p>' + image))

    # ---- issue 11: know-your-data sections, when the run has an inspect/ folder (featurepipe run writes one)
    if (run_dir / "inspect" / "inspect.json").exists():
        from featurepipe.report.inspect_sections import inspect_sections

        sections += inspect_sections(run_dir / "inspect", charts, dataset.get("source"), thumbnails, progress,
                                     failed_listed_elsewhere=True, run_dir=run_dir)

    # ---- reproduce
    tick(S_REPRODUCE)
    sections.append((S_REPRODUCE, _reproduce_section(config)))

    html_path = run_dir / "report.html"
    page = _page(config, run_dir, sections, missing)
    atomic.write_text(html_path, page)
    return ReportResult(html_path=html_path, png_paths=list(charts.paths), sections=[t for t, _ in sections],
                        missing=missing)


# -------------------------------------------------------------------------------------------- sections


def _page(config: dict, run_dir: Path, sections: list[tuple[str, str]], missing: list[str]) -> str:
    dataset = config.get("dataset") or {}
    source = dataset.get("source") or str(run_dir)
    backbone = (config.get("backbone") or {}).get("name", "")
    title = f"featurepipe report: {Path(source).name}" + (f" / {backbone}" if backbone else "")
    nav = "".join(f'<a href="#{_e(t.lower().replace(" ", "-"))}">{_e(t)}</a>' for t, _ in sections)
    absent = ""
    if missing:
        absent = (f'<p class="note">Not in this run directory (sections left out): '
                  f'{", ".join(f"<code>{_e(m)}</code>" for m in missing)}</p>')
    body = "".join(_section(t, b) for t, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><p class=\"sub path\">{_e(run_dir.resolve())}</p>"
            f"<nav>{nav}</nav>{absent}{body}"
            f'<footer>Written by <code>featurepipe report</code>. All charts and thumbnails are embedded; '
            f'the charts are also saved as PNG files in <code>{_e(run_dir / "report")}</code>.</footer>'
            f"</main></body></html>\n")


def _nested_section(nested: dict) -> str:
    acc = nested.get("accuracy") or {}
    if acc.get("mean") is None:
        return '<p class="note">nested.json holds no accuracy; re-run `featurepipe evaluate`.</p>'
    interval = ""
    if acc.get("ci_low") is not None:
        interval = f" (95% interval {_num(acc['ci_low'])} – {_num(acc['ci_high'])})"
    cards = (f'<div class="cards"><div class="card best"><div class="k">nested CV accuracy: the headline</div>'
             f'<div class="v">{_num(acc["mean"])}</div><div>{_e(interval)}</div></div>'
             f'<div class="card"><div class="k">best leaderboard row</div>'
             f'<div class="v">{_num(nested.get("best_inner_accuracy"))}</div></div>'
             f'<div class="card"><div class="k">optimism gap (best row − nested)</div>'
             f'<div class="v">{_num(nested.get("optimism_gap"))}</div></div></div>')
    text = ('<p class="sub">For each outer fold, the whole search (feature set, head, parameters, ensemble) ran '
            'on the other folds only; the configuration it chose, trained without the outer fold, was scored on '
            'it. That estimates what the saved model will score on new photos; the best leaderboard row was '
            'chosen on the folds that score it, and is optimistic by about the gap.</p>')
    if any(str(f.get("chosen", "")).startswith("vote of ") for f in nested.get("folds") or []):
        text += ('<p class="sub">With several feature sets the procedure is a vote: each feature set\'s best '
                 'logistic regression (its C chosen by the inner folds), their probabilities averaged. It is always '
                 'the vote, never one row picked among many near-equal ones, which is what made picking optimistic '
                 'on small folds.</p>')
    rows = [[_e(f"{f.get('repeat', 0)}/{f.get('fold')}"), _e(f.get("chosen", "")), _num(f.get("inner_accuracy")),
             _num(f.get("accuracy"))] for f in nested.get("folds") or []]
    table = _table(["outer fold", "chosen by the inner search", "inner CV accuracy", "outer accuracy"], rows)
    return cards + text + table


def _run_section(config: dict, dataset: dict, best_key, best_row, board: pd.DataFrame) -> str:
    parts = []
    cards = []
    if best_row is not None:
        ci = ""
        if "accuracy_ci_low" in best_row.index:
            ci = f" [{_num(best_row['accuracy_ci_low'])}, {_num(best_row['accuracy_ci_high'])}]"
        cards.append(f'<div class="card best"><div class="k">best head (CV accuracy, 95% interval; chosen on the same '
                     f'folds, so optimistic: see nested cross-validation)</div>'
                     f'<div class="v">{_e(_config_label(best_key))}</div>'
                     f'<div>{_num(best_row["accuracy_mean"])}{_e(ci)}</div></div>')
    counts = dict(dataset.get("counts") or {})
    order = [c for c in (dataset.get("classes") or []) if c in counts]
    counts = {**{c: counts[c] for c in order}, **counts}       # the classes' own order, not the JSON's
    if counts:
        cards.append(f'<div class="card"><div class="k">images / classes</div>'
                     f'<div class="v">{sum(int(v) for v in counts.values())} / {len(counts)}</div></div>')
    if config.get("folds"):
        cards.append(f'<div class="card"><div class="k">folds × repeats</div>'
                     f'<div class="v">{_e(config.get("folds"))} × {_e(config.get("repeats", 1))}</div></div>')
    cards.append(f'<div class="card"><div class="k">configurations compared</div>'
                 f'<div class="v">{len(board)}</div></div>')
    parts.append(f'<div class="cards">{"".join(cards)}</div>')

    left = []
    info = [("source", f'<span class="path">{_e(dataset.get("source", "–"))}</span>'),
            ("layout", _e(dataset.get("layout", "–"))),
            ("created", _e(config.get("created", "–")))]
    splits = dataset.get("splits") or {}
    if splits:
        info.append(("splits", _e(", ".join(f"{k}: {v}" for k, v in splits.items()))))
    if config.get("augment"):
        info.append(("augmented views", _e(f"{config['augment']} per image (seed {config.get('augment_seed', 0)})")))
    info.append(("TTA", _e("yes" if config.get("tta") else "no")))
    left.append("<h3>Dataset</h3>" + _kv_table(info))
    backbone = config.get("backbone") or {}
    if backbone:
        left.append("<h3>Backbone</h3>" + _kv_table([(k, _e("–" if v is None else v)) for k, v in backbone.items()]))
    right = []
    if counts:
        total = max(1, max(int(v) for v in counts.values()))
        rows = [[_e(name), str(int(n)),
                 f'<span style="display:inline-block;height:9px;width:{int(120 * int(n) / total)}px;'
                 f'background:{OTHER_COLOUR};border-radius:2px"></span>'] for name, n in counts.items()]
        right.append(f"<h3>Classes ({len(counts)})</h3>" + _table(["class", "images", ""], rows, numeric={1}))
    elif dataset.get("classes"):
        right.append("<h3>Classes</h3><p>" + _e(", ".join(dataset["classes"])) + "</p>")
    parts.append(f'<div class="grid2"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>')

    failed = dataset.get("failed") or []
    if failed:
        rows = [[f'<span class="path">{_e(f.get("path", ""))}</span>', _e(f.get("reason", ""))] for f in failed]
        parts.append(f"<h3>Files that could not be used ({len(failed)})</h3>" + _table(["path", "reason"], rows))
    warnings = dataset.get("warnings") or []
    if warnings:
        parts.append(f"<h3>Warnings ({len(warnings)})</h3><ul class=\"warn\">"
                     + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    return "".join(parts)


def _leaderboard_section(charts: _Charts, board: pd.DataFrame, best_key) -> str:
    limit = 40
    intro = ('<p class="sub">Every head, parameter set and augmentation mode, scored by k-fold cross-validation on '
             'the training split. Bars: mean accuracy over folds; whiskers: 95% interval over folds. '
             f'The best (refit and saved) is <span style="color:{BEST_COLOUR};font-weight:600">highlighted</span>.</p>')
    image = _leaderboard_chart(charts, board, best_key, limit)
    if len(board) > limit:
        image += f'<p class="note">Chart shows the best {limit} of {len(board)}; the table lists all.</p>'
    columns = ["#", "head", "params", "views", "accuracy", "95% interval"]
    extra = [m for m in METRICS[1:] if f"{m}_mean" in board.columns]
    columns += [METRIC_LABELS[m] for m in extra] + ["folds"]
    rows, classes = [], []
    for position, record in enumerate(board.to_dict("records"), 1):
        interval = "–"
        if "accuracy_ci_low" in record:
            interval = f"{_num(record['accuracy_ci_low'])} – {_num(record['accuracy_ci_high'])}"
        accuracy = _num(record["accuracy_mean"])
        if "accuracy_std" in record:
            accuracy += f" ± {_num(record['accuracy_std'])}"
        folds = _num(record.get("n_folds", ""), 0)
        if record.get("repeats") not in (None, "") and str(record.get("repeats")) not in ("1", "1.0", "nan"):
            folds += f" × {_num(record['repeats'], 0)}"
        rank = record.get("rank", position)
        rows.append([_num(rank, 0), _e(record["head"]), f"<code>{_e(_params_text(record.get('params', '{}')))}</code>",
                     _e(record.get("augment", "none")), accuracy, interval]
                    + [_num(record[f"{m}_mean"]) for m in extra] + [folds])
        classes.append("best" if record["_key"] == best_key else "")
    numeric = {0, 4, 5, *range(6, 6 + len(extra) + 1)}
    return intro + image + _table(columns, rows, numeric=numeric, row_classes=classes)


def _folds_section(charts: _Charts, folds: pd.DataFrame, board: pd.DataFrame, best_key) -> str:
    order = [k for k in board["_key"] if (folds["_key"] == k).any()]
    note = ""
    if len(order) > 12:
        # Too many grid points for one readable chart: keep the best configuration of each head and mode.
        seen, kept = set(), []
        for key in order:
            if (key[0], key[2]) not in seen or key == best_key:
                seen.add((key[0], key[2]))
                kept.append(key)
        note = (f'<p class="note">{len(order)} configurations were scored; the chart shows the best of each '
                f'head and augmentation mode ({len(kept)}).</p>')
        order = kept
    if not order:
        return '<p class="note">folds.csv has no rows matching the leaderboard.</p>'
    image = _folds_chart(charts, folds, order, best_key)
    rows = []
    for key in order:
        values = folds.loc[folds["_key"] == key, "accuracy"].dropna().to_numpy(dtype=float)
        rows.append([_e(_config_label(key)), str(len(values)), _num(values.min() if len(values) else np.nan),
                     _num(np.median(values) if len(values) else np.nan), _num(values.max() if len(values) else np.nan)])
    table = _table(["configuration", "folds", "worst", "median", "best"], rows, numeric={1, 2, 3, 4},
                   row_classes=["best" if k == best_key else "" for k in order])
    return ('<p class="sub">Accuracy of every validation fold: a wide spread means the ranking above is '
            'less certain than the means suggest.</p>' + note + image + table)


def _confusion_section(charts: _Charts, counts: np.ndarray, classes: list[str], best_name: str, repeats: int) -> str:
    totals = counts.sum(axis=1)
    pooled = (f" Counts are summed over {repeats} repeats, so each image is counted {repeats} times."
              if repeats > 1 else "")
    intro = (f'<p class="sub">Out-of-fold predictions of the best head, <b>{_e(best_name)}</b>: each training '
             f'image predicted by the model that did not see it. Rows: true class; columns: predicted class; '
             f'shading: share of the row.{_e(pooled)}</p>')
    head = '<th class="corner">true ↓ / predicted →</th>' + "".join(f'<th class="cls">{_e(c)}</th>' for c in classes) \
        + '<th class="num">total</th><th class="num">recall</th>'
    body = []
    for i, name in enumerate(classes):
        cells = []
        for j in range(len(classes)):
            share = counts[i, j] / totals[i] if totals[i] else 0.0
            colour = "#fff" if share > 0.6 else "inherit"
            tint = "31,119,180" if i == j else "207,34,46"
            if counts[i, j] == 0:
                cells.append(f'<td class="cm zero" data-true="{_e(name)}" data-pred="{_e(classes[j])}"><b>0</b></td>')
                continue
            cells.append(f'<td class="cm" data-true="{_e(name)}" data-pred="{_e(classes[j])}" '
                         f'style="background:rgba({tint},{max(share, 0.06) * 0.85:.3f});color:{colour}">'
                         f"<b>{int(counts[i, j])}</b><span>{share * 100:.0f}%</span></td>")
        recall = counts[i, i] / totals[i] if totals[i] else float("nan")
        body.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}<td class=\"num\">{int(totals[i])}</td>"
                    f"<td class=\"num\">{_num(recall)}</td></tr>")
    table = (f'<div class="scroll"><table class="confusion"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>')
    accuracy = np.trace(counts) / counts.sum() if counts.sum() else float("nan")
    summary = f'<p>{int(np.trace(counts))} of {int(counts.sum())} predictions correct (accuracy {_num(accuracy)}).</p>'
    image = _confusion_chart(charts, counts, classes)
    return intro + table + summary + image


def _per_class_section(charts: _Charts, counts: np.ndarray, classes: list[str], best_name: str, repeats: int) -> str:
    stats = _per_class(counts, classes)
    rows = [[_e(r["class"]), _num(r["precision"]), _num(r["recall"]), _num(r["f1"]), str(r["support"]),
             str(r["predicted"])] for r in stats.to_dict("records")]
    table = _table(["class", "precision", "recall", "F1", "true images", "predicted as"], rows,
                   numeric={1, 2, 3, 4, 5})
    return (f'<p class="sub">Computed from the out-of-fold predictions of <b>{_e(best_name)}</b>'
            + (f" (pooled over {repeats} repeats)" if repeats > 1 else "")
            + '. Precision: of the images predicted as the class, the share that are; recall: of the images '
              'of the class, the share found.</p>' + table + _per_class_chart(charts, stats))


def _mistakes_section(best_oof: pd.DataFrame, repeats: int, limit: int, source: Optional[str], best_name: str,
                      progress: Optional[ProgressCallback]) -> str:
    mistakes = _mistakes(best_oof, repeats)
    if not mistakes:
        return f'<p>No training image was misclassified by <b>{_e(best_name)}</b> out of fold.</p>'
    shown = mistakes[:max(0, limit)]
    figures, absent = [], []
    for index, mistake in enumerate(shown, 1):
        report(progress, "thumbnails", index, len(shown), Path(mistake.path).name)
        image_path = _resolve_image(mistake.path, source)
        png = _thumbnail(image_path) if image_path is not None else None
        if png is not None:
            picture = f'<img src="{_data_uri(png)}" alt="{_e(Path(mistake.path).name)}">'
        else:
            reason = "file not found" if image_path is None else "cannot be decoded"
            picture = f'<div class="noimg">no thumbnail<br>({_e(reason)})</div>'
            absent.append((mistake.path, reason))
        wrong = f" · wrong in {mistake.wrong} of {repeats} repeats" if repeats > 1 else ""
        figures.append(
            f'<figure class="miss" data-confidence="{mistake.confidence:.6f}">'
            f'<div class="thumb">{picture}</div><figcaption>'
            f'<span class="lab true">true: {_e(mistake.true)}</span><br>'
            f'<span class="lab pred">predicted: {_e(mistake.pred)}</span> '
            f'<span class="conf">p={_num(mistake.confidence)}</span>'
            f'<br><span class="muted">p(true)={_num(mistake.p_true)}{_e(wrong)}</span>'
            f'<span class="path" title="{_e(mistake.path)}">{_e(_short_path(mistake.path, source))}</span>'
            f'</figcaption></figure>')
    intro = (f'<p class="sub">{len(mistakes)} training image(s) misclassified out of fold by <b>{_e(best_name)}</b>; '
             f'showing {len(shown)}, most confident mistakes first (p = probability of the wrong prediction). '
             'Confident mistakes are often mislabelled images.</p>')
    parts = [intro, f'<div class="gallery">{"".join(figures)}</div>']
    if absent:
        rows = [[f'<span class="path">{_e(p)}</span>', _e(r)] for p, r in absent]
        parts.append(f"<h3>Images without a thumbnail ({len(absent)})</h3>" + _table(["path", "reason"], rows))
    if len(mistakes) > len(shown):
        parts.append(f'<p class="note">{len(mistakes) - len(shown)} more not shown '
                     f'(<code>featurepipe report --thumbnails N</code> shows more).</p>')
    return "".join(parts)


def _holdout_section(holdout: pd.DataFrame, best_name: str) -> str:
    if holdout.empty:
        return '<p class="note">holdout.csv is empty.</p>'
    columns = list(holdout.columns)
    rows = [[_cell(v) if c not in METRICS else _num(v) for c, v in zip(columns, record)]
            for record in holdout.itertuples(index=False)]
    numeric = {i for i, c in enumerate(columns) if pd.api.types.is_numeric_dtype(holdout[c])}
    return (f'<p class="sub"><b>{_e(best_name)}</b> refit on the whole training split and scored once on the '
            f'held-out split(s): an estimate not used to choose the head.</p>'
            + _table([METRIC_LABELS.get(c, c) for c in columns], rows, numeric=numeric))


def _training_section(charts: _Charts, directory: Path, png_name: str, title: str) -> str:
    history_path, summary_path = directory / "history.csv", directory / "summary.json"
    if not history_path.exists() and not summary_path.exists():
        return ""
    parts = []
    if summary_path.exists():
        summary = read_json(summary_path)
        if isinstance(summary, dict):
            parts.append(_summary_block(summary))
    if history_path.exists():
        image = _curves_chart(charts, _read_csv(history_path), png_name, title)
        if image:
            parts.append(image)
    else:
        parts.append(f'<p class="note">{_e(history_path.name)} missing: no curves.</p>')
    return "".join(parts)


def _comparison(run_dir: Path, best_row) -> str:
    """Frozen features vs fine-tuning vs from scratch, on one line each, when the numbers exist."""
    rows = []
    if best_row is not None:
        rows.append(["frozen base + best head (CV accuracy on train)", _num(best_row["accuracy_mean"])])
    for name, label in (("finetune", "fine-tuned (validation accuracy after)"),
                        ("baseline", "small convnet from scratch (validation accuracy)")):
        path = run_dir / name / "summary.json"
        if path.exists():
            summary = read_json(path)
            after = summary.get("after") if isinstance(summary, dict) else None
            if isinstance(after, dict) and "val_accuracy" in after:
                rows.append([_e(label), _num(after["val_accuracy"])])
    if len(rows) < 2:
        return ""
    return "<h3>Side by side</h3>" + _table(["approach", "accuracy"], rows, numeric={1}) + \
        '<p class="note">CV and validation accuracies are measured on different images; compare with care.</p>'


def _reproduce_section(config: dict) -> str:
    if not config:
        return '<p class="note">config.json is missing, so the run cannot be reproduced from this report.</p>'
    notes = []
    backbone = config.get("backbone") or {}
    if backbone.get("weights") == "random" and backbone.get("seed"):
        notes.append(f"the backbone used random weights with seed {backbone['seed']}, which `featurepipe "
                     f"evaluate` does not take as an option")
    notes.append("image groups (--groups / --groups-from) are not recorded in config.json; add the same option "
                 "if the run used one")
    return ('<p class="sub">The command that repeats this run (cached features are reused, so it is fast):</p>'
            f'<pre class="cmd">{_e(_reproduce_command(config))}</pre>'
            + "".join(f'<p class="note">Note: {_e(n)}.</p>' for n in notes)
            + "<h3>config.json</h3>"
            + f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>")


# ------------------------------------------------------------------------------------ fine-tuning


_FINETUNE_SETTINGS = ("strategy", "unfreeze_blocks", "trainable_params", "optimizer", "lr", "schedule",
                      "warmup_epochs", "label_smoothing", "weight_decay", "momentum", "batch_size", "epochs",
                      "patience", "epochs_run", "best_epoch", "seed", "validation", "train_images", "val_images",
                      "mixed_precision", "jit_compile")


def _finetune_section(charts: _Charts, directory: Path, source: Optional[str]) -> str:
    """Fine-tuning: before/after on the same validation images and what was kept, what was unfrozen,
    the time it took, the curves, and the validation images whose answer changed."""
    history_path, summary_path = directory / "history.csv", directory / "summary.json"
    if not history_path.exists() and not summary_path.exists():
        return ""
    summary = read_json(summary_path) if summary_path.exists() else {}
    summary = summary if isinstance(summary, dict) else {}
    parts = []
    kept, decision = summary.get("kept"), summary.get("decision") or {}
    if kept:
        verdict = ("the fine-tuned model is the run's model" if kept == "finetuned"
                   else "the run keeps the frozen best head as its model")
        parts.append(f'<p class="sub"><b>{_e(verdict)}</b>: {_e(summary.get("reason", ""))}</p>')
    if summary.get("before") or summary.get("after"):
        images = summary.get("val_images")
        parts.append(f'<h3>Before and after, on the same {_e(images) if images else ""} validation images</h3>'
                     + _summary_block({"before": summary.get("before"), "after": summary.get("after")}))
    if decision:
        low, high = (decision.get("loss_change_interval") or [None, None])[:2]
        parts.append(_kv_table([
            ("images gained / lost", f"{_e(decision.get('gained'))} / {_e(decision.get('lost'))}"),
            ("loss change, 95% bootstrap interval", f"{_num(decision.get('loss_change'), 4)} "
                                                    f"({_num(low, 4)} to {_num(high, 4)})"),
            ("McNemar p (gained vs lost)", _num(decision.get("mcnemar_p"), 3)),
        ]))
    unfrozen = summary.get("unfrozen_layers") or []
    settings = [(key, _e(summary[key])) for key in _FINETUNE_SETTINGS if key in summary]
    if unfrozen:
        settings.insert(2, ("base layers trained", _e(f"{len(unfrozen)}: {unfrozen[0]} … {unfrozen[-1]}"
                                                     if len(unfrozen) > 1 else unfrozen[0])))
    for key, label in (("seconds", "time (s)"), ("seconds_per_epoch", "time per epoch (s)")):
        if summary.get(key) is not None:
            settings.append((label, _num(summary[key], 1)))
    for note in summary.get("notes") or []:
        settings.append(("note", _e(note)))
    if settings:
        parts.append("<h3>What was trained</h3>" + _kv_table(settings))
    test = summary.get("test")
    if isinstance(test, dict) and test.get("frozen"):
        rows = [[_e(name), _num(test[name].get("val_accuracy")), _num(test[name].get("val_loss"), 4)]
                for name in ("frozen", "finetuned") if isinstance(test.get(name), dict)]
        parts.append(f"<h3>Test split ({_e(test.get('images'))} images, scored once after every choice)</h3>"
                     + _table(["model", "accuracy", "loss"], rows, numeric={1, 2}))
    if history_path.exists():
        image = _curves_chart(charts, _read_csv(history_path), "finetune_curves.png", "fine-tuning")
        if image:
            parts.append(image)
    else:
        parts.append(f'<p class="note">{_e(history_path.name)} missing: no curves.</p>')
    predictions = directory / "validation_predictions.csv"
    if predictions.exists():
        frame = _read_csv(predictions)
        if {"path", "label", "before_pred", "after_pred"} <= set(frame.columns):
            right_before = frame["before_pred"].astype(str) == frame["label"].astype(str)
            right_after = frame["after_pred"].astype(str) == frame["label"].astype(str)
            changed = frame[right_before != right_after]
            if len(changed):
                rows = [[_e(_short_path(str(r.path), source)), _e(r.label), _e(r.before_pred), _e(r.after_pred),
                         "gained" if r.after_pred == r.label else "lost"] for r in changed.itertuples()]
                parts.append("<h3>Validation images whose answer changed</h3>"
                             + _table(["image", "label", "frozen head", "fine-tuned", ""], rows))
    return "".join(parts)
