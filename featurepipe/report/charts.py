"""The report's charts: matplotlib figures saved as PNG files in the run's report/ folder and embedded
as <img> tags, and the signed cache that copies a chart drawn earlier from the same data instead of
drawing it again."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from featurepipe.core import atomic, trust
from featurepipe.report.configs import short_label
from featurepipe.report.html import BEST_COLOUR, OTHER_COLOUR, data_uri, esc

# Bump when a chart's drawing code changes: cached PNGs of the old drawing are then never reused.
CHART_CACHE_VERSION = 2         # 2: votes by their size, the leaderboard's axis zoomed to the data
CHART_CACHE_FILES = 256          # PNGs kept in a chart cache (the newest; the rest are removed)
_CHART_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


class Charts:
    """Saves matplotlib figures as PNG files in RUN_DIR/report/ and hands back <img> tags.

    With `cache` (a folder in the cache root `run` was given, never one read from a run's files), a
    chart drawn from the same data as before is copied instead of drawn again: drawing the report's
    charts was ~1 s of a ~4 s no-change re-run of `run` (see cached_chart)."""

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
        return f'<img class="chart" src="{data_uri(png)}" alt="{esc(alt)}">'

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


def cached_chart(name: str):
    """Reuse the PNG of a chart drawn earlier from the same data (when the Charts has a cache).

    `name` goes into the cache key in place of the drawing function's own name: the keys of charts
    cached by earlier versions name the functions as they were spelled then (_leaderboard_chart, ...),
    and a renamed function must not orphan them."""
    def decorate(draw):
        @functools.wraps(draw)
        def wrapper(charts: Charts, *args, **kwargs):
            if charts.cache is None:
                return draw(charts, *args, **kwargs)
            key = _chart_key(name, args, kwargs)
            reused = charts.reuse(key)
            if reused is not None:
                return reused
            charts.pending = key
            try:
                return draw(charts, *args, **kwargs)
            finally:
                charts.pending = None
        return wrapper
    return decorate


def _plain(text: str) -> str:
    """Text for a matplotlib label: a "$" would otherwise start mathtext (and can fail to render)."""
    return str(text).replace("$", r"\$")


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


CHART_LABEL_CHARS = 40
# Inches of the bar charts' plot area (their labels come on top). Scaled to a phone's 366 px, a 9-inch
# chart with 64-character labels (~1,500 px) showed 3-4 px text; 5.5 inches and 40 characters keep it
# about twice that, and the desktop page shows them at their own size.
CHART_WIDTH = 5.5


def _chart_label(key) -> str:
    """A configuration's y-axis label, cut to CHART_LABEL_CHARS: a vote's label lists every member (~600
    characters for `run`'s nine), which made the charts ~3,700 px wide with the bars squeezed to the
    right and cost ~0.4 s of rendering; the table below each chart keeps the whole label."""
    label = short_label(key)
    if len(label) > CHART_LABEL_CHARS:
        label = label[:CHART_LABEL_CHARS - 1].rstrip() + "\u2026"
    return _plain(label)


def leaderboard_axis(shown: pd.DataFrame) -> tuple[float, float]:
    """The leaderboard chart's accuracy axis, zoomed to the data (means and intervals) with a margin and
    kept inside [0, 1]: on a 0-1 axis 0.958 and 0.983 look equal, and telling them apart is the chart's job."""
    columns = [c for c in ("accuracy_mean", "accuracy_ci_low", "accuracy_ci_high") if c in shown.columns]
    values = shown[columns].to_numpy(dtype=float).ravel()
    values = values[~np.isnan(values)]
    if not len(values):
        return 0.0, 1.0
    span = max(float(values.max() - values.min()), 0.02)
    low = max(0.0, float(values.min()) - 0.1 * span)
    high = min(1.0, float(values.max()) + 0.1 * span)
    if high - low < 0.02:
        low = max(0.0, high - 0.02)
    return math.floor(low * 200) / 200, min(1.0, math.ceil(high * 200) / 200)


@cached_chart("_leaderboard_chart")
def leaderboard_chart(charts: Charts, board: pd.DataFrame, best_key, limit: int = 40) -> str:
    shown = board.head(limit)
    labels = [_chart_label(k) for k in shown["_key"]]
    means = shown["accuracy_mean"].to_numpy(dtype=float)
    n = len(shown)
    fig, ax = charts.figure(CHART_WIDTH, 0.38 * n + 1.3)
    y = np.arange(n)
    colours = [BEST_COLOUR if k == best_key else OTHER_COLOUR for k in shown["_key"]]
    ax.barh(y, np.nan_to_num(means), color=colours, height=0.65)
    if {"accuracy_ci_low", "accuracy_ci_high"} <= set(shown.columns):
        low = np.clip(means - shown["accuracy_ci_low"].to_numpy(dtype=float), 0, None)
        high = np.clip(shown["accuracy_ci_high"].to_numpy(dtype=float) - means, 0, None)
        ax.errorbar(np.nan_to_num(means), y, xerr=[np.nan_to_num(low), np.nan_to_num(high)], fmt="none",
                    ecolor="#333333", elinewidth=1.2, capsize=3)
    low, high = leaderboard_axis(shown)
    for yi, mean in zip(y, means):
        if math.isnan(mean):
            continue
        if mean - low > 0.15 * (high - low):     # inside the bar's end, white; a short bar: after it, dark
            ax.text(mean - (high - low) * 0.01, yi, f"{mean:.3f}", va="center", ha="right", color="white",
                    fontsize=8, fontweight="bold")
        else:
            ax.text(max(mean, low) + (high - low) * 0.01, yi, f"{mean:.3f}", va="center", ha="left",
                    color="#333333", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(low, high)
    ax.xaxis.set_major_locator(charts.plt.MaxNLocator(5))
    ax.set_xlabel(f"CV accuracy (axis {low:.3f} to {high:.3f})\nbars: mean over folds, whiskers: 95% interval")
    _style(ax)
    return charts.save(fig, "leaderboard.png", "leaderboard: accuracy per head with 95% intervals")


@cached_chart("_folds_chart")
def folds_chart(charts: Charts, folds: pd.DataFrame, order: list, best_key) -> str:
    data = [folds.loc[folds["_key"] == key, "accuracy"].dropna().to_numpy(dtype=float) for key in order]
    labels = [_chart_label(k) for k in order]
    n = len(order)
    fig, ax = charts.figure(CHART_WIDTH, 0.42 * n + 1.3)
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


@cached_chart("_confusion_chart")
def confusion_chart(charts: Charts, counts: np.ndarray, classes: list[str]) -> str:
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


@cached_chart("_per_class_chart")
def per_class_chart(charts: Charts, stats: pd.DataFrame) -> str:
    k = len(stats)
    fig, ax = charts.figure(CHART_WIDTH, 0.45 * k + 1.4)
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


@cached_chart("_curves_chart")
def curves_chart(charts: Charts, history: pd.DataFrame, name: str, title: str) -> Optional[str]:
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
