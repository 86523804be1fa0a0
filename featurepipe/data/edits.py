"""Feeding `inspect`'s findings back: --exclude and --relabel CSVs applied to a scanned dataset.

Both change only the dataset table (rows, labels): features are keyed by content hash, so the next
evaluate reuses every feature and re-fits only the CV folds whose labels changed. What was applied
is kept in `Dataset.edits` and written to the run's config.json.

- exclude CSV: a `path` column; every listed image is left out (e.g. suspects.csv with the rows
  you want to keep deleted).
- relabel CSV: columns `path` and `label` (the new label); when there is no `label` column the
  `suggested` column of inspect's suspects.csv is used, and the summary says so.

Paths may be absolute, relative to the CSV's folder, or relative to the dataset folder. A path
that matches no image, or a label that is not a class, is an error naming the line: a typo must
not silently leave a mislabelled image in.
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
        rows = _match(dataset, csv, table)
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
                            "listed": len(rows), "changed": changed}
        warnings.append(f"relabelled {len(changed)} image(s) from {csv} (column '{column}')")
    if exclude is not None:
        csv = Path(exclude)
        table = _read(csv, "an exclude CSV needs a path column")
        rows = sorted(set(_match(dataset, csv, table)))
        edits["exclude"] = {"csv": str(csv.resolve()), "sha256": _digest(csv),
                            "paths": frame.loc[rows, "path"].tolist()}
        frame = frame.drop(index=rows).reset_index(drop=True)
        warnings.append(f"excluded {len(rows)} image(s) listed in {csv}")
    classes = [c for c in dataset.classes if (frame["label"] == c).any()]
    if len(classes) < 2:
        raise DatasetError("after --exclude/--relabel fewer than 2 classes have images; check the CSVs")
    return Dataset(dataset.source, dataset.layout, frame, classes if classes != dataset.classes else dataset.classes,
                   warnings, dataset.ignored, list(dataset.unreadable), edits)
