"""Scanning a dataset: folder layouts or a CSV manifest -> one table of path, label, split, group, hash.

Labels, splits and paths live here and only here; features are keyed by content hash, so renaming
a file or fixing a label never recomputes a feature.

What a scan reads is confined to the dataset: the manifest's own folder, or DATA. Symbolic links
are resolved and a file whose real location lies outside is refused (the scan fails naming the
link, its target and `--allow-outside-root`) before anything opens it: a dataset someone hands you
(an archive can hold links) must not be able to feed ~/private/photo.jpg into a report's thumbnails
or make featurepipe read /etc/shadow. Links that stay inside are followed as before. Folder layouts
obey the same rule as manifests because the threat is the same; a user who builds DATA from links
into a photo library says so once with the option.

featurepipe's own cache (a folder holding core.cachedirs.MARKER, or the cache root the scan is
given) is left out wherever it lies inside DATA, with a warning: `cd DATA && featurepipe run .`
puts ./cache there, and its charts must not become a class.

Class names are the labels every CSV, labels.txt, JSON file and terminal line carries: a name with a
control character (a line break splits labels.txt and CSV rows) is refused at the scan, and names
that are the same text in another Unicode normalisation (café as NFC and NFD: the same on screen)
are an error naming both; names that differ only by case are a warning (letters datasets have
`A` and `a` on purpose).
"""

from __future__ import annotations

import contextvars
import csv
import os
import re
import unicodedata
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
from featurepipe.core.cachedirs import CACHE_ENV, hash_db, is_cache_root
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


def walk_images(directory: Path, scope: Optional["_Scope"] = None) -> tuple[list[Path], int]:
    """Image files under `directory` in a stable order, and how many other (hidden, non-image) files were skipped.
    With a `scope` (a dataset scan), featurepipe's cache folders are left out and noted there."""
    images: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d)
                             and not (scope is not None and scope.is_cache(Path(dirpath) / d)))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_hidden(name) or not _is_image(path):
                ignored += 1
            else:
                images.append(path)
    return images, ignored


def _subdirs(directory: Path, scope: Optional["_Scope"] = None) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not _is_hidden(p.name)
                  and not (scope is not None and scope.is_cache(p)))


# Line and paragraph breaks and every other control character: labels.txt holds one class a line, and
# the csv module (3.11) leaves a lone \r unquoted.
_CONTROL = ("Cc", "Zl", "Zp")


def _control_character(label: str) -> Optional[str]:
    """The first control character of `label`, as an escape (e.g. '\\n'), or None."""
    bad = next((ch for ch in label if unicodedata.category(ch) in _CONTROL), None)
    return None if bad is None else ascii(bad)[1:-1]


class _Scope:
    """What one scan may read: files whose real location (links resolved) lies under the dataset's
    real folder, unless outside reads are allowed; and which folders inside are featurepipe's cache.

    Each folder is resolved once (os.path.realpath costs an lstat per path component); a file itself
    costs one lstat, to see whether it is a link."""

    def __init__(self, root: Path, allowed: bool, cache_dir: Optional[Path]) -> None:
        self.root = Path(os.path.realpath(root))
        self.allowed = allowed
        self.cache = Path(os.path.realpath(cache_dir)) if cache_dir is not None else None
        self.caches: list[Path] = []          # cache folders left out, in the order met
        self.refused: list[str] = []          # one line per file or folder that leads outside
        self.origin: dict[str, str] = {}      # label -> where it came from (class folder, manifest line)
        self._real_dirs: dict[str, str] = {}

    def is_cache(self, folder: Path) -> bool:
        if not (is_cache_root(folder) or (self.cache is not None and Path(os.path.realpath(folder)) == self.cache)):
            return False
        if folder not in self.caches:
            self.caches.append(folder)
        return True

    def real(self, path: Path) -> Path:
        """Where `path` really is: its folder resolved once per folder, the file itself when it is a link."""
        parent = str(path.parent)
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(parent)
        candidate = os.path.join(real_parent, path.name)
        return Path(os.path.realpath(candidate) if os.path.islink(candidate) else candidate)

    def outside(self, path: Path, real: Optional[Path] = None) -> Optional[Path]:
        """The real location of `path` when it is a file or folder outside the dataset (and that is not
        allowed), else None. A link to something that holds no data to read (a device, a FIFO, nothing
        at all) is left to the per-file checks, which skip it without reading it (hashcache)."""
        if self.allowed:
            return None
        real = self.real(path) if real is None else real
        if real == self.root or self.root in real.parents:
            return None
        return real if real.is_file() or real.is_dir() else None

    def refuse(self, where: str, path, target: Path) -> None:
        self.refused.append(f"{where}{path} is a symbolic link (or lies in a linked folder) to {target}")

    def check(self, what: str) -> None:
        """Fail naming the first refused link (and how many more), its target and the option."""
        if self.refused:
            more = f" (and {len(self.refused) - 1} more like it)" if len(self.refused) > 1 else ""
            raise DatasetError(
                f"{self.refused[0]}{more}, outside {what} {self.root}; featurepipe does not follow links out of "
                f"a dataset, and opened nothing there. Copy the file(s) in, or allow it: "
                f"`featurepipe --allow-outside-root COMMAND ...` (or scan(..., allow_outside_root=True))")

    def warnings(self) -> list[str]:
        return [f"{folder} is featurepipe's cache folder, not part of the dataset: left out of the scan (keep the "
                f"cache outside the dataset with --cache-dir or ${CACHE_ENV})" for folder in self.caches]


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


def _scan_class_folders(root: Path, split: str, rows: _Rows, warnings: list[str], scope: _Scope) -> int:
    ignored = sum(1 for p in root.iterdir() if p.is_file())
    for class_dir in _subdirs(root, scope):
        label = class_dir.name
        bad = _control_character(label)
        if bad is not None:
            raise DatasetError(f"class folder {class_dir!r} has a control character ({bad}) in its name, which would "
                               f"break labels.txt and the CSVs; rename the folder")
        target = scope.outside(class_dir, Path(os.path.realpath(class_dir)))
        if target is not None:
            scope.refuse("class folder ", class_dir, target)   # nothing under it is listed, let alone opened
            continue
        images, skipped = walk_images(class_dir, scope)
        ignored += skipped
        if not images:
            warnings.append(f"class folder {class_dir} has no images; it is left out")
        scope.origin.setdefault(label, f"class folder {class_dir}")
        for p in images:
            target = scope.outside(p)
            if target is not None:
                scope.refuse("", p, target)
                continue
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


def _scan_manifest(manifest: Path, warnings: list[str], allow_outside_root: bool = False,
                   scope: Optional[_Scope] = None) -> pd.DataFrame:
    """The manifest's usable rows (path, label, split, group), warnings appended in line order."""
    header, lines = _read_manifest_rows(manifest)
    missing = {"path", "label"} - set(header)
    if missing:
        raise DatasetError(
            f"{manifest}: missing column(s) {', '.join(sorted(missing))}; expected columns path,label[,split][,group], "
            f"found {', '.join(header) or 'none'}"
        )
    base = Path(os.path.normpath(manifest.parent))
    scope = scope if scope is not None else _Scope(base, allow_outside_root, None)
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
        bad = _control_character(label)
        if bad is not None:
            raise DatasetError(f"{manifest}:{line}: label {label!r} has a control character ({bad}), which would "
                               f"break labels.txt and the CSVs; fix the label")
        path = Path(record["path"].strip())
        path = Path(os.path.normpath(path if path.is_absolute() else base / path))
        if not allow_outside_root and not _inside(path, base):
            outside.append(f"{manifest}:{line}: {record['path'].strip()}")
            continue
        # Inside by name, but a link (or a linked folder on the way) may lead out: resolved before
        # anything opens the file (exists() below only stats it, and only when it stays inside).
        target = scope.outside(path)
        if target is not None:
            scope.refuse(f"{manifest}:{line}: ", record["path"].strip(), target)
            continue
        scope.origin.setdefault(label, f"label {label!r} ({manifest}:{line})")
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
    scope.check("the manifest's folder")
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


def _detect_layout(root: Path, scope: Optional[_Scope] = None) -> str:
    names = {p.name.lower() for p in _subdirs(root, scope)}
    split_dirs = names & set(SPLIT_NAMES)
    if split_dirs and split_dirs == names:
        return "splits"
    if split_dirs:
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(sorted(split_dirs))}) with other folders "
            f"({', '.join(sorted(names - split_dirs))}); use either DATA/<class>/ or DATA/<split>/<class>/"
        )
    return "folders"


def _check_names(classes: list[str], origin: dict[str, str], warnings: list[str]) -> None:
    """Names that are one text in two Unicode normalisations are an error (indistinguishable on screen,
    merging them silently would change the results); names equal but for case are a warning."""
    def where(label: str) -> str:
        return f"{origin.get(label, repr(label))} ({ascii(label)})"

    for key_of, same in ((lambda c: unicodedata.normalize("NFC", c), None),
                         (lambda c: unicodedata.normalize("NFC", c).casefold(), "case")):
        names: dict[str, list[str]] = {}
        for label in classes:
            names.setdefault(key_of(label), []).append(label)
        for labels in (group for group in names.values() if len(group) > 1):
            listed = " and ".join(where(label) for label in labels)
            if same is None:
                raise DatasetError(
                    f"{listed} are the same class name written in different Unicode normalisations (NFC/NFD: they "
                    f"look identical but would be separate classes); rename one so the names match, e.g. "
                    f"`convmv -f utf8 -t utf8 --nfc -r --notest DATA` for folders")
            warnings.append(f"{listed} differ only by case and are separate classes; rename one if they are "
                            f"the same class")


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
        scope = _Scope(Path(os.path.normpath(source.parent)), allow_outside_root, cache_dir)
        table = _scan_manifest(source, warnings, allow_outside_root, scope)
    else:
        scope = _Scope(source, allow_outside_root, cache_dir)
        layout = _detect_layout(source, scope)
        if layout == "splits":
            ignored += sum(1 for p in source.iterdir() if p.is_file())
            for split_dir in _subdirs(source, scope):
                ignored += _scan_class_folders(split_dir, SPLIT_NAMES[split_dir.name.lower()], rows, warnings, scope)
        else:
            ignored += _scan_class_folders(source, "train", rows, warnings, scope)
        scope.check("the dataset folder")
        warnings.extend(scope.warnings())
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
    _check_names(classes, scope.origin, warnings)
    for label, count in frame.loc[frame["split"] == "train", "label"].value_counts().items():
        if count == 1:
            warnings.append(f"class {label!r} has a single training image; cross-validation needs at least 2 per class")
    _warn_duplicates(frame, warnings)
    return Dataset(source, layout, frame, classes, warnings, ignored, unreadable)


def require_usable_images(dataset: Dataset, usable: set, failed: dict[str, str]) -> None:
    """Fail, naming the class and its first files with the reason each failed, when no training image
    of a class can be used (`usable`: the content hashes that have features; `failed`: path -> why,
    from extraction). Cross-validation would otherwise say only "class 'x' has only 0 images"."""
    train = dataset.frame[dataset.frame["split"] == "train"]
    gone = ~train["hash"].isin(usable)
    if not gone.any():
        return
    for label in dataset.classes:
        rows = train[train["label"] == label]
        if rows.empty or rows["hash"].isin(usable).any():
            continue
        paths = rows["path"].tolist()
        shown = "; ".join(f"{path}: {failed.get(path, 'no features in the cache (extract it again)')}"
                          for path in paths[:3])
        more = f"; and {len(paths) - 3} more" if len(paths) > 3 else ""
        raise DatasetError(f"class '{label}' has {len(paths)} training image(s) and none of them could be used: "
                           f"{shown}{more}. Fix or replace those files, or remove the class, and run again")


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
