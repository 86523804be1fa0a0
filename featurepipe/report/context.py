"""What every section of the run report reads, loaded once from the run directory: the leaderboard,
the fold scores, the out-of-fold predictions, config.json and best_head.json, and what follows from
them (the best configuration, its out-of-fold rows, its confusion counts)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from featurepipe.core import csvcells, trust
from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.progress import ProgressCallback
from featurepipe.report.analysis import confusion_counts
from featurepipe.report.charts import Charts
from featurepipe.report.configs import config_key, short_label, with_key
from featurepipe.rundir.layout import CONFIG, FOLDS, HEAD_META, LEADERBOARD, OOF, REPORT_DIR
from featurepipe.rundir.folder import read_json

# Columns that hold names, never numbers: read them as text so a class called "NA" or "1" survives.
TEXT_COLUMNS = ("head", "params", "augment", "path", "true", "pred", "split", "phase", "stage")


def read_csv(path: Path) -> pd.DataFrame:
    try:
        # Only empty cells are missing values: "NA", "None" or "null" may well be class names.
        frame = csvcells.read(path, keep_default_na=False, na_values=[""],
                            dtype={c: str for c in TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise FeaturepipeError(f"{path}: cannot be read as CSV ({error}); re-run `featurepipe evaluate`") from None
    for column in TEXT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].fillna("")
    return frame


@dataclass
class ReportContext:
    """The run directory's files as the sections use them; optional files are None (or {}) when absent."""

    run_dir: Path
    board: pd.DataFrame                  # leaderboard.csv, with configs.with_key's _key column
    config: dict                         # config.json
    best_meta: dict                      # best_head.json
    folds: Optional[pd.DataFrame]        # folds.csv, keyed
    oof: Optional[pd.DataFrame]          # oof_predictions.csv, keyed
    charts: Charts
    thumbnails: int                      # misclassified images shown with a thumbnail, at most
    progress: Optional[ProgressCallback]

    @property
    def dataset(self) -> dict:
        return self.config.get("dataset") or {}

    @property
    def source(self) -> Optional[str]:
        return self.dataset.get("source")

    @cached_property
    def classes(self) -> list[str]:
        classes = [str(c) for c in (self.dataset.get("classes") or self.best_meta.get("classes") or [])]
        if not classes and self.oof is not None:
            classes = sorted(set(self.oof["true"]) | set(self.oof["pred"]))
        return classes

    @cached_property
    def best_key(self) -> tuple[str, str, str]:
        """The saved head's configuration; without best_head.json, the leaderboard's first row."""
        meta = self.best_meta
        if meta.get("head"):
            head = f"{meta['features']} {meta['head']}" if meta.get("features") else meta["head"]
            return config_key(head, meta.get("params", {}), meta.get("augment", "none"))
        return self.board["_key"].iloc[0]

    @cached_property
    def best_row(self) -> Optional[pd.Series]:
        rows = self.board[self.board["_key"] == self.best_key]
        return rows.iloc[0] if len(rows) else None

    @cached_property
    def best_name(self) -> str:
        """The saved model's short name (a vote by its size: its members are listed once, in Run)."""
        return short_label(self.best_key)

    @cached_property
    def best_oof(self) -> Optional[pd.DataFrame]:
        """The best configuration's out-of-fold rows; None when there are none."""
        if self.oof is None or not {"true", "pred"} <= set(self.oof.columns):
            return None
        rows = self.oof[self.oof["_key"] == self.best_key]
        return None if rows.empty else rows

    @cached_property
    def repeats(self) -> int:
        best = self.best_oof
        return int(best["repeat"].nunique()) if best is not None and "repeat" in best.columns else 1

    @cached_property
    def counts(self) -> np.ndarray:
        """The best head's confusion counts (rows: true class, columns: predicted)."""
        return confusion_counts(self.best_oof, self.classes)


def load_context(run_dir: Path, thumbnails: int, progress: Optional[ProgressCallback],
                 chart_cache: Optional[Path]) -> ReportContext:
    """Read a finished evaluate run; a missing or foreign leaderboard is an error that says what to run."""
    if not run_dir.is_dir():
        raise FeaturepipeError(f"run directory {run_dir} does not exist; run `featurepipe evaluate` first "
                               f"(it prints the run directory it wrote)")
    leaderboard_path = run_dir / LEADERBOARD
    if not leaderboard_path.exists():
        raise FeaturepipeError(f"{leaderboard_path} is missing; {run_dir} is not a finished evaluate run. "
                               f"Run `featurepipe evaluate` first and point `featurepipe report` at its run directory")
    board = read_csv(leaderboard_path)
    needed = {"head", "accuracy_mean"} - set(board.columns)
    if needed:
        raise FeaturepipeError(f"{leaderboard_path} lacks column(s) {', '.join(sorted(needed))}; it was not written "
                               f"by `featurepipe evaluate` (re-run it)")
    if board.empty:
        raise FeaturepipeError(f"{leaderboard_path} has no rows; re-run `featurepipe evaluate`")
    _numeric(board, leaderboard_path, [c for c in board.columns if c.endswith(METRIC_SUFFIXES)])

    def optional(name: str, read: Callable[[Path], object], absent=None):
        return read(run_dir / name) if (run_dir / name).exists() else absent

    return ReportContext(
        run_dir=run_dir, board=with_key(board), config=optional(CONFIG, _json_object, {}),
        best_meta=optional(HEAD_META, _json_object, {}),
        folds=optional(FOLDS, lambda path: with_key(_folds(path))),
        oof=optional(OOF, lambda path: with_key(read_csv(path))),
        charts=Charts(trust.writable(run_dir, REPORT_DIR, folder=True), chart_cache), thumbnails=thumbnails, progress=progress)


# A leaderboard's summary columns (accuracy_mean, log_loss_ci_high...) and a fold table's scores are
# numbers; an edited or damaged file would otherwise draw nonsense or fail deep inside a chart.
METRIC_SUFFIXES = ("_mean", "_std", "_ci_low", "_ci_high")
FOLD_COLUMNS = ("head", "params", "augment", "accuracy")
FOLD_NUMBERS = ("accuracy", "repeat", "fold")


def _numeric(frame: pd.DataFrame, path: Path, columns) -> None:
    """Refuse a column that should hold numbers and holds text, naming the file, column and row."""
    for column in columns:
        values = frame[column]
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() & values.notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise FeaturepipeError(f"{path}: column {column} holds {str(values.iloc[row])!r} on data row {row + 1}, "
                                   f"not a number; the file was edited or damaged: re-run `featurepipe evaluate`")
        frame[column] = numbers


def _json_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise FeaturepipeError(f"{path} is not a JSON object (it holds a {type(data).__name__}); it was edited or "
                               f"damaged: re-run `featurepipe evaluate`")
    return data


def _folds(path: Path) -> pd.DataFrame:
    """folds.csv, checked: the columns the fold chart groups by, and numbers where numbers belong."""
    folds = read_csv(path)
    missing = [c for c in FOLD_COLUMNS if c not in folds.columns]
    if missing:
        raise FeaturepipeError(f"{path} lacks column(s) {', '.join(missing)}; it was edited or damaged: re-run "
                               f"`featurepipe evaluate`")
    _numeric(folds, path, [c for c in FOLD_NUMBERS if c in folds.columns])
    return folds
