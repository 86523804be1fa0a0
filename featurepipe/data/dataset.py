"""Scanning a dataset: folder layouts or a CSV manifest -> one table of path, label, split, group, hash.

Labels, splits and paths live here and only here; features are keyed by content hash, so renaming
a file or fixing a label never recomputes a feature.
"""

from __future__ import annotations

import contextvars
import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from featurepipe.core import columns
from featurepipe.core.errors import DatasetError
from featurepipe.core.hashcache import HashCache, path_key
from featurepipe.data.images import IMAGE_EXTENSIONS
from featurepipe.core.cachedirs import hash_db
from featurepipe.core.progress import ProgressCallback, report

SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
COLUMNS = ["path", "label", "split", "group", "hash", "bytes"]


@dataclass
class Dataset:
    source: Path
    layout: str                       # "folders" | "splits" | "manifest"
    frame: pd.DataFrame               # COLUMNS, one row per usable image file
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    ignored: int = 0                  # hidden files and files that are not images by extension
    unreadable: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    edits: dict = field(default_factory=dict)   # --exclude / --relabel applied (featurepipe.data.edits), for config.json

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def splits(self) -> dict[str, int]:
        return self.frame["split"].value_counts().to_dict()

    def class_counts(self, split: Optional[str] = None) -> dict[str, int]:
        frame = self.frame if split is None else self.frame[self.frame["split"] == split]
        counts = frame["label"].value_counts()
        return {label: int(counts.get(label, 0)) for label in self.classes}

    def subset(self, split: str) -> "Dataset":
        return Dataset(self.source, self.layout, self.frame[self.frame["split"] == split].reset_index(drop=True),
                       self.classes, list(self.warnings), self.ignored, list(self.unreadable), dict(self.edits))


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def walk_images(directory: Path) -> tuple[list[Path], int]:
    """Image files under `directory` in a stable order, and how many other (hidden, non-image) files were skipped."""
    images: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_hidden(name) or not _is_image(path):
                ignored += 1
            else:
                images.append(path)
    return images, ignored


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not _is_hidden(p.name))


# Rows are gathered into small tables of ROWS_CHUNK rows (pandas' Arrow strings under pandas 3), and
# every later pass (group names, hashing) takes ROWS_CHUNK rows at a time: Python objects per image
# (~600 bytes: a path, a hash, the hash cache's answer) only ever exist for one chunk.
ROWS_CHUNK = 4096
_TEXT = pd.Series(["x"]).dtype    # what pandas makes of a list of str: "str" (pandas 3) or object


def _column(values: list) -> pd.Series:
    """One chunk of a column, with the dtype pandas gives the whole list: text columns as _TEXT,
    a text column with no value at all (no group anywhere) as object Nones, numbers inferred."""
    if values and all(v is None or isinstance(v, str) for v in values):
        return pd.Series(values, dtype=object if all(v is None for v in values) else _TEXT)
    return pd.Series(values)


def _concat(parts: list[pd.Series]) -> pd.Series:
    if not parts:
        return pd.Series([], dtype=object)
    if len({part.dtype for part in parts}) > 1:
        parts = [part.astype(_TEXT) for part in parts]   # chunks with and without groups: text, as for the whole list
    return pd.concat(parts, ignore_index=True)


class _Rows:
    """Scanned rows as columns. A dict per image cost ~400 bytes each and Python lists ~150 (tens of
    MB at 70,000 images, the bulk of a scan's peak memory); here only the open chunk is Python
    objects, the rest compact tables. A name that is not valid UTF-8 (which no CSV, JSON or Arrow
    string can hold) is set aside in `unreadable` as it arrives, by a printable form of its name."""

    def __init__(self, *names: str) -> None:
        self.names = names or ("path", "label", "split", "group")
        self._open: list[list] = [[] for _ in self.names]
        self._tables: list[pd.DataFrame] = []
        self.unreadable: list[tuple[str, str]] = []

    def add(self, *values) -> None:
        path = values[0]
        if path_key(path) != path:
            self.unreadable.append((path_key(path), "file name is not valid UTF-8; rename the file (e.g. with "
                                                    "convmv) to use it"))
            return
        for column, value in zip(self._open, values):
            column.append(value)
        if len(self._open[0]) >= ROWS_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._open[0]:
            self._tables.append(pd.DataFrame({n: _column(v) for n, v in zip(self.names, self._open)}))
            self._open = [[] for _ in self.names]

    def table(self) -> pd.DataFrame:
        """Every row so far, one column per name (empty columns of dtype object when there are none)."""
        self._flush()
        tables, self._tables = self._tables, []
        return pd.DataFrame({n: _concat([t[n] for t in tables]) for n in self.names}, columns=list(self.names))


def _scan_class_folders(root: Path, split: str, rows: _Rows, warnings: list[str]) -> int:
    ignored = sum(1 for p in root.iterdir() if p.is_file())
    for class_dir in _subdirs(root):
        images, skipped = walk_images(class_dir)
        ignored += skipped
        if not images:
            warnings.append(f"class folder {class_dir} has no images; it is left out")
        label = class_dir.name
        for p in images:
            rows.add(str(p), label, split, None)
    return ignored


# `featurepipe --allow-outside-root COMMAND`: set for one command, read by whichever scan it runs
# (scans happen deep inside `run`, `evaluate`, `baseline`...).
_ALLOW_OUTSIDE_ROOT: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_outside_root", default=False)


@contextmanager
def outside_root_allowed(allowed: bool = True) -> Iterator[None]:
    token = _ALLOW_OUTSIDE_ROOT.set(allowed)
    try:
        yield
    finally:
        _ALLOW_OUTSIDE_ROOT.reset(token)


def _manifest_lines(manifest: Path) -> Iterator:
    """The header (a list of names), then (line number, fields) for each non-blank line, each line
    checked to have the header's field count."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            yield header
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue   # blank line
                if len(fields) != len(header):
                    raise DatasetError(
                        f"{manifest}:{reader.line_num}: {len(fields)} field(s) but the header has {len(header)} "
                        f"({','.join(header)}); fix that line (quote a value that contains a comma)")
                yield reader.line_num, fields
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{manifest}: cannot be read as CSV ({error}); expected UTF-8 text with columns "
                           f"path,label[,split][,group]") from None


def _read_manifest_rows(manifest: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """(header, lines: (line number, fields)) with every line checked to have the header's field count.

    The csv module, not pandas: given one line with an extra field, pandas silently takes the
    first column as the index and shifts every other one, and all rows then read as missing files.
    The check is a first pass that keeps nothing (a bad line fails before any row is used); `lines`
    reads the file again as it is consumed, so 70,000 lines are never held in memory at once."""
    lines = _manifest_lines(manifest)
    header = next(lines)
    for _ in lines:
        pass
    if not header:
        raise DatasetError(f"{manifest} is empty; expected columns path,label[,split][,group]")
    lines = _manifest_lines(manifest)
    next(lines)
    return header, lines


def _inside(path: Path, root: Path) -> bool:
    """Lexically (.. collapsed, symlinks not followed, as for folder layouts): is `path` under `root`?"""
    normal = Path(os.path.normpath(path))
    return normal == root or root in normal.parents


def _scan_manifest(manifest: Path, warnings: list[str], allow_outside_root: bool = False) -> pd.DataFrame:
    """The manifest's usable rows (path, label, split, group), warnings appended in line order."""
    header, lines = _read_manifest_rows(manifest)
    missing = {"path", "label"} - set(header)
    if missing:
        raise DatasetError(
            f"{manifest}: missing column(s) {', '.join(sorted(missing))}; expected columns path,label[,split][,group], "
            f"found {', '.join(header) or 'none'}"
        )
    base = Path(os.path.normpath(manifest.parent))
    outside: list[str] = []
    # Every listed row goes into compact columns with its line and whether its file exists; repeats
    # and missing files are settled on the whole path column afterwards, so no dict of every path
    # (~250 bytes per row at 70,000 rows) is held while reading.
    listed = _Rows("path", "label", "split", "group", "line", "exists")
    notes: list[tuple[int, str]] = []   # (line, warning): one per line at most, said in line order
    for line, fields in lines:
        record = dict(zip(header, fields))
        label = record["label"].strip()
        if not record["path"].strip() or not label:
            notes.append((line, f"{manifest}:{line}: empty path or label; row left out"))
            continue
        path = Path(record["path"].strip())
        path = Path(os.path.normpath(path if path.is_absolute() else base / path))
        if not allow_outside_root and not _inside(path, base):
            outside.append(f"{manifest}:{line}: {record['path'].strip()}")
            continue
        split = SPLIT_NAMES.get((record.get("split") or "train").strip().lower())
        if split is None:
            raise DatasetError(f"{manifest}:{line}: unknown split {record['split']!r}; use train, validation or test")
        listed.add(str(path), label, split, (record.get("group") or "").strip() or None, line, path.exists())
    if outside:
        more = f" (and {len(outside) - 1} more row(s) like it)" if len(outside) > 1 else ""
        raise DatasetError(
            f"{outside[0]} lies outside the manifest's folder {base}{more}; featurepipe only "
            f"reads files under it unless you allow it: `featurepipe --allow-outside-root COMMAND ...` "
            f"(or scan(..., allow_outside_root=True))")
    table = listed.table()
    repeat = columns.duplicated(table["path"], keep="first")
    if repeat.any():
        listings = columns.duplicated(table["path"], keep=False)
        first: dict[str, tuple[int, str]] = {}   # only paths listed more than once: (line, label) of the first
        for path, label, line, again in zip(table["path"][listings], table["label"][listings],
                                            table["line"][listings], repeat[listings]):
            if not again:
                first[path] = (line, label)
                continue
            earlier, earlier_label = first[path]
            also = f" (with label {earlier_label!r} there, {label!r} here)" if earlier_label != label else ""
            notes.append((line, f"{manifest}:{line}: {path} is already listed on line {earlier}{also}; "
                                f"the repeat is left out"))
    gone = ~repeat & ~table["exists"].to_numpy(dtype=bool)
    for path, line in zip(table["path"][gone], table["line"][gone]):
        notes.append((line, f"{manifest}:{line}: {path} does not exist; row left out"))
    warnings.extend(text for _, text in sorted(notes, key=lambda note: note[0]))
    keep = ~repeat & ~gone
    table = table[["path", "label", "split", "group"]]
    return table if keep.all() else table[keep].reset_index(drop=True)


def _detect_layout(root: Path) -> str:
    names = {p.name.lower() for p in _subdirs(root)}
    split_dirs = names & set(SPLIT_NAMES)
    if split_dirs and split_dirs == names:
        return "splits"
    if split_dirs:
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(sorted(split_dirs))}) with other folders "
            f"({', '.join(sorted(names - split_dirs))}); use either DATA/<class>/ or DATA/<split>/<class>/"
        )
    return "folders"


def _check_labels(frame: pd.DataFrame, warnings: list[str], source: Path) -> list[str]:
    classes = sorted(frame["label"].unique())
    if not classes:
        raise DatasetError(
            f"no images found in {source}; expected DATA/<class>/<image> folders, DATA/<split>/<class>/<image>, "
            f"or a CSV manifest with columns path,label (image types: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if len(classes) == 1:
        raise DatasetError(
            f"only one class ({classes[0]!r}) found in {source}; a classifier needs at least two class folders"
        )
    splits = set(frame["split"].unique())
    if len(splits) > 1:
        train_labels = set(frame.loc[frame["split"] == "train", "label"])
        if not train_labels:
            raise DatasetError(f"{source} has no training images; put them under {source}/train/<class>/")
        for split in sorted(splits - {"train"}):
            labels = set(frame.loc[frame["split"] == split, "label"])
            unknown = labels - train_labels
            if unknown:
                raise DatasetError(
                    f"the {split} split has class(es) {', '.join(sorted(unknown))} that train lacks; "
                    f"the class folders must have the same names in every split"
                )
            if train_labels - labels:
                warnings.append(f"the {split} split has no images of {', '.join(sorted(train_labels - labels))}")
    return classes


def _warn_duplicates(frame: pd.DataFrame, warnings: list[str]) -> None:
    # Only hashes seen more than once: iterating one group per image costs seconds on 70,000 files
    # (and columns.duplicated finds them without pandas' ~22 MB hash table of every hash).
    frame = frame[columns.duplicated(frame["hash"], keep=False)]
    for digest, group in frame.groupby("hash"):
        if group["label"].nunique() > 1:
            pairs = ", ".join(f"{p} ({label})" for p, label in zip(group["path"], group["label"]))
            warnings.append(f"the same image appears under different labels: {pairs}")
        elif group["split"].nunique() > 1:
            pairs = ", ".join(f"{p} ({s})" for p, s in zip(group["path"], group["split"]))
            warnings.append(f"the same image appears in several splits, which inflates scores: {pairs}")


def scan(
    source: str | os.PathLike,
    cache_dir: Optional[Path] = None,
    groups_pattern: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    rehash: bool = False,
    allow_outside_root: Optional[bool] = None,
) -> Dataset:
    """Scan DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest into a Dataset.

    `cache_dir` (the cache root) keeps content hashes by (path, size, mtime); `groups_pattern` is
    a regex whose first group (or whole match) taken from the file name becomes the image's group.
    `rehash` re-reads every file instead of trusting remembered hashes; `allow_outside_root` lets a
    manifest name files outside its own folder (None: as `outside_root_allowed` says, default no).
    """
    if allow_outside_root is None:
        allow_outside_root = _ALLOW_OUTSIDE_ROOT.get()
    # Absolute paths: the hash cache is keyed by path, and runs outlive the working directory.
    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise DatasetError(f"{source} does not exist; pass a folder of class folders or a CSV manifest")
    rows = _Rows()
    warnings: list[str] = []
    ignored = 0
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"{source} is a file but not a .csv manifest; pass a folder or a CSV with columns path,label")
        layout = "manifest"
        table = _scan_manifest(source, warnings, allow_outside_root)
    else:
        layout = _detect_layout(source)
        if layout == "splits":
            ignored += sum(1 for p in source.iterdir() if p.is_file())
            for split_dir in _subdirs(source):
                ignored += _scan_class_folders(split_dir, SPLIT_NAMES[split_dir.name.lower()], rows, warnings)
        else:
            ignored += _scan_class_folders(source, "train", rows, warnings)
        table = rows.table()
    # A name that is not valid UTF-8 could be hashed and decoded, but no CSV, JSON or terminal
    # downstream can write it: _Rows reported it by a printable form of its name instead.
    unreadable: list[tuple[str, str]] = rows.unreadable
    if groups_pattern:
        regex = _group_regex(groups_pattern)
        table["group"] = _concat([_column(_groups_from_names(paths, regex))
                                  for paths in columns.chunks(table["path"], ROWS_CHUNK)])
    cache = HashCache(hash_db(cache_dir) if cache_dir is not None else None, rehash=rehash)
    hashes, sizes, hashed = [], [], []
    try:
        report(progress, "scan", 0, len(table), "hashing")
        for paths in columns.chunks(table["path"], ROWS_CHUNK):
            answers = cache.hash_files(paths)
            found = [answers[p] for p in paths]
            del answers
            hashes.append(_column([h for h, _ in found]))
            sizes.append(_column([size for _, size in found]))
            hashed.append(np.fromiter((not h.startswith("error:") for h, _ in found), dtype=bool, count=len(found)))
            unreadable += [(p, h[len("error:"):]) for p, (h, _) in zip(paths, found) if h.startswith("error:")]
    finally:
        cache.close()
    warnings.extend(cache.warnings)
    frame = pd.DataFrame({**{c: table[c] for c in table.columns}, "hash": _concat(hashes), "bytes": _concat(sizes)},
                         columns=COLUMNS)
    del table, hashes, sizes
    # Unhashable files (gone, unreadable, not regular) are left out of the table.
    if hashed and not all(part.all() for part in hashed):
        frame = frame[np.concatenate(hashed)].reset_index(drop=True)
    report(progress, "scan", len(frame), len(frame), "hashed")
    classes = _check_labels(frame, warnings, source)
    for label, count in frame.loc[frame["split"] == "train", "label"].value_counts().items():
        if count == 1:
            warnings.append(f"class {label!r} has a single training image; cross-validation needs at least 2 per class")
    _warn_duplicates(frame, warnings)
    return Dataset(source, layout, frame, classes, warnings, ignored, unreadable)


def _group_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise DatasetError(f"--groups pattern {pattern!r} is not a valid regular expression: {error}") from None


def _groups_from_names(paths: list[str], regex: re.Pattern) -> list[Optional[str]]:
    groups = []
    for path in paths:
        match = regex.search(Path(path).name)
        if match is None:
            groups.append(Path(path).name)   # an image the pattern misses is its own group
        else:
            groups.append(match.group(1) if match.groups() else match.group(0))
    return groups


def load_groups(dataset: Dataset, manifest: str | os.PathLike) -> Dataset:
    """Take group ids from a manifest (columns path,group), matching rows by path or file name."""
    if not Path(manifest).is_file():
        raise DatasetError(f"--groups-from {manifest}: no such file; pass a CSV with columns path,group")
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if not {"path", "group"} <= set(table.columns):
        raise DatasetError(f"{manifest}: a groups manifest needs columns path,group; found {', '.join(table.columns)}")
    base = Path(manifest).parent
    by_path = {str((base / p).resolve()) if not Path(p).is_absolute() else str(Path(p).resolve()): g
               for p, g in zip(table["path"], table["group"])}
    by_name = {Path(p).name: g for p, g in zip(table["path"], table["group"])}
    frame = dataset.frame.copy()
    frame["group"] = [by_path.get(str(Path(p).resolve()), by_name.get(Path(p).name)) for p in frame["path"]]
    missing = frame["group"].isna().sum()
    warnings = list(dataset.warnings)
    if missing:
        warnings.append(f"{missing} image(s) have no group in {manifest}; each is its own group")
        frame.loc[frame["group"].isna(), "group"] = frame.loc[frame["group"].isna(), "path"]
    return Dataset(dataset.source, dataset.layout, frame, dataset.classes, warnings, dataset.ignored, dataset.unreadable,
                   dict(dataset.edits))
