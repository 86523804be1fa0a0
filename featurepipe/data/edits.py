"""Feeding `inspect`'s findings back: --exclude and --relabel CSVs applied to a scanned dataset.

Both change only the dataset table (rows, labels): features are keyed by content hash, so the next
evaluate reuses every feature and re-fits only the CV folds whose labels changed. What was applied
is kept in `Dataset.edits` and written to the run's config.json.

- exclude CSV: a `path` column; every listed image is left out.
- relabel CSV: columns `path` and `label` (the new label); when there is no `label` column the
  `suggested` column of inspect's suspects.csv is used, and the summary says so.

A CSV with a `flagged` column (inspect's suspects.csv and label_scores.csv) is a list of candidates,
not of decisions: most of its rows are only the lowest-margin images, listed for a look, and passing
it back unedited used to drop correct images (issue 23: 15 of 24 images of a set with CV accuracy
1.000, none of them flagged). So such a CSV acts only on the rows marked true: --relabel on rows whose
`flagged` cell is true, --exclude on rows whose `flagged` or `outlier` cell is true (an outlier has
no label evidence, but it is a reason to leave an image out). The rule is the same for an unedited
and an edited file, so the file says exactly what will happen: to act on another row set its
`flagged` cell to True, to keep a flagged image set it to False or delete the row, and to act on
every row drop the column. The rows left alone are counted in the warning and in config.json's
`edits`. A CSV without a `flagged` column acts on every row, as it always did.

Paths may be absolute, relative to the CSV's folder, or relative to the dataset folder. A path
that matches no image (on any row, acted on or left alone: a file made for another dataset is found
at once), or a label that is not a class, is an error naming the line: a typo must not silently
leave a mislabelled image in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import pandas as pd

from featurepipe.data.dataset import Dataset
from featurepipe.core import csvcells
from featurepipe.core.errors import DatasetError


def _read(csv: Path, needed: str) -> pd.DataFrame:
    try:
        # suspects.csv and the other CSVs featurepipe writes carry formula-neutralised cells ('=...): read
        # back as the values they stand for, so their paths and labels match.
        table = csvcells.read(csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"{csv}: cannot be read as CSV ({error}); {needed}") from None
    if "path" not in table.columns:
        raise DatasetError(f"{csv}: no 'path' column; {needed} (found: {', '.join(table.columns) or 'none'})")
    return table


def _match(dataset: Dataset, csv: Path, table: pd.DataFrame) -> list[int]:
    """Dataset row index for each CSV row, trying absolute, CSV-relative and dataset-relative paths."""
    by_path = {str(Path(p).resolve()): i for i, p in enumerate(dataset.frame["path"])}
    source = Path(dataset.source)
    bases = [csv.resolve().parent, source if source.is_dir() else source.parent]
    rows, unknown = [], []
    for line, text in enumerate(table["path"], start=2):
        if not text.strip():
            continue
        candidates = [Path(text)] if Path(text).is_absolute() else [b / text for b in bases]
        hit = next((by_path[str(c.resolve())] for c in candidates if str(c.resolve()) in by_path), None)
        if hit is None:
            unknown.append(f"line {line}: {text}")
        rows.append(hit)
    if unknown:
        raise DatasetError(f"{csv}: {len(unknown)} path(s) match no image of {dataset.source} "
                           f"({'; '.join(unknown[:5])}{'; ...' if len(unknown) > 5 else ''}); "
                           f"fix or delete those rows")
    return rows


# Cells pandas writes for a bool column, and what a person types in a spreadsheet.
_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n", ""}


def _marked(csv: Path, table: pd.DataFrame, columns: tuple[str, ...]) -> pd.Series:
    """Whether each row is marked true in any of `columns` present in `table` (a flagged CSV's rule)."""
    marked = pd.Series(False, index=table.index)
    for column in columns:
        if column not in table.columns:
            continue
        cells = table[column].str.strip().str.lower()
        bad = [f"line {line}: {text!r}" for line, text, cell in zip(table.index + 2, table[column], cells)
               if cell not in _TRUE and cell not in _FALSE]
        if bad:
            raise DatasetError(f"{csv}: column '{column}' must be True or False ({'; '.join(bad[:5])}"
                               f"{'; ...' if len(bad) > 5 else ''}); set True on the rows to act on, False on "
                               f"the others")
        marked |= cells.isin(_TRUE)
    return marked


def _acting(csv: Path, table: pd.DataFrame, columns: tuple[str, ...]) -> pd.Series:
    """Which rows act: all of them, or in a CSV with a `flagged` column only its marked rows."""
    if "flagged" not in table.columns:
        return pd.Series(True, index=table.index)
    return _marked(csv, table, columns)


def _left_alone(count: int, columns: str) -> str:
    if not count:
        return ""
    return (f"; {count} row(s) left alone because their {columns} cell is not True (inspect lists them for a "
            f"look, not as actions): set it to True to act on a row, or drop the 'flagged' column to act on "
            f"every row")


def _digest(csv: Path) -> str:
    return hashlib.sha256(Path(csv).read_bytes()).hexdigest()[:16]


def apply_fixes(dataset: Dataset, exclude: Optional[str | os.PathLike] = None,
                relabel: Optional[str | os.PathLike] = None) -> Dataset:
    """The dataset with the relabel CSV's labels applied and the exclude CSV's images left out."""
    if exclude is None and relabel is None:
        return dataset
    frame = dataset.frame.copy()
    edits = dict(dataset.edits)
    warnings = list(dataset.warnings)
    if relabel is not None:
        csv = Path(relabel)
        table = _read(csv, "a relabel CSV needs columns path,label")
        column = "label" if "label" in table.columns else "suggested" if "suggested" in table.columns else None
        if column is None:
            raise DatasetError(f"{csv}: no 'label' (or 'suggested') column with the new labels; "
                               f"a relabel CSV needs columns path,label")
        table = table[table["path"].str.strip() != ""]
        # Every path must name an image, also on rows left alone: a typo, or another dataset's file, is
        # found before anything is changed.
        listed = _match(dataset, csv, table)
        acting = _acting(csv, table, ("flagged",))
        ignored = int((~acting).sum())
        table, rows = table[acting], [row for row, act in zip(listed, acting) if act]
        empty = [f"line {line}" for line, label in zip(table.index + 2, table[column]) if not label.strip()]
        if empty:
            # inspect's suspects.csv suggests a class only for a flagged label issue: a row flagged by hand
            # needs its new label written down.
            raise DatasetError(f"{csv}: no new label in column '{column}' on {', '.join(empty[:5])}"
                               f"{', ...' if len(empty) > 5 else ''}; write the label (a 'label' column with "
                               f"the new class), or set flagged to False on rows that should keep theirs")
        unknown = sorted(set(table[column]) - set(dataset.classes))
        if unknown:
            raise DatasetError(f"{csv}: label(s) {', '.join(unknown)} are not classes of {dataset.source} "
                               f"({', '.join(dataset.classes)}); relabelling cannot add a class")
        changed = []
        for row, label in zip(rows, table[column]):
            if frame.at[row, "label"] != label:
                changed.append({"path": frame.at[row, "path"], "from": frame.at[row, "label"], "to": label})
                frame.at[row, "label"] = label
        edits["relabel"] = {"csv": str(csv.resolve()), "sha256": _digest(csv), "column": column,
                            "listed": len(listed), "changed": changed}
        if "flagged" in table.columns:
            edits["relabel"]["left_alone"] = ignored      # rows not flagged (a suspects.csv: only flagged ones act)
        warnings.append(f"relabelled {len(changed)} image(s) from {csv} (column '{column}')"
                        + _left_alone(ignored, "'flagged'"))
    if exclude is not None:
        csv = Path(exclude)
        table = _read(csv, "an exclude CSV needs a path column")
        table = table[table["path"].str.strip() != ""]
        listed = _match(dataset, csv, table)
        acting = _acting(csv, table, ("flagged", "outlier"))
        ignored = int((~acting).sum())
        rows = sorted(set(row for row, act in zip(listed, acting) if act))
        edits["exclude"] = {"csv": str(csv.resolve()), "sha256": _digest(csv),
                            "paths": frame.loc[rows, "path"].tolist()}
        if "flagged" in table.columns:
            edits["exclude"]["left_alone"] = ignored
        frame = frame.drop(index=rows).reset_index(drop=True)
        warnings.append(f"excluded {len(rows)} image(s) listed in {csv}"
                        + _left_alone(ignored, "'flagged' (or 'outlier')"))
    classes = [c for c in dataset.classes if (frame["label"] == c).any()]
    if len(classes) < 2:
        raise DatasetError("after --exclude/--relabel fewer than 2 classes have images; check the CSVs")
    return Dataset(dataset.source, dataset.layout, frame, classes if classes != dataset.classes else dataset.classes,
                   warnings, dataset.ignored, list(dataset.unreadable), edits)
