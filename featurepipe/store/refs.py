"""What refers to cached features: each scanned dataset records its content hashes and the stores
it used, so `cache gc` can drop what nothing refers to any more."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from featurepipe.core import columns
from featurepipe.core.atomic import atomic_path, write_json
from featurepipe.core.cachedirs import refs_dir


def record(root: Path, dataset, stores) -> None:
    directory = refs_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    source = str(Path(dataset.source).resolve())
    path = directory / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"
    hashes = SortedHashes(dataset.frame["hash"])
    known_stores, same_hashes = _known(path, hashes)
    fingerprints = sorted(set(known_stores or []) | {s.fingerprint for s in stores})
    if same_hashes and known_stores == fingerprints:
        return
    _write(path, {"source": source, "stores": fingerprints, "updated": time.time()}, hashes)


class SortedHashes:
    """A column's distinct hashes in sorted order, as one array of fixed-width UTF-8 bytes sorted in
    place and read a chunk at a time: a set and a sorted list of 70,000 Python strings cost ~15 MB,
    a sorted copy of the (chunked Arrow) column ~9 MB; this is ~4.5 MB."""

    def __init__(self, hashes: pd.Series):
        self._sorted = columns.joined([columns.encoded(part) for part in columns.chunks(hashes)])
        self._sorted.sort()
        distinct = np.append(True, self._sorted[1:] != self._sorted[:-1])
        if not distinct.all():
            self._sorted = self._sorted[distinct]

    def __len__(self) -> int:
        return len(self._sorted)

    def chunks(self) -> Iterator[list[str]]:
        for start in range(0, len(self._sorted), columns.CHUNK_ROWS):
            yield [h.decode("utf-8") for h in self._sorted[start:start + columns.CHUNK_ROWS].tolist()]

    def __iter__(self) -> Iterator[str]:
        for part in self.chunks():
            yield from part


# The layout atomic.write_json gives a ref (indent 2, sorted keys): "hashes" comes first, one per line.
_OPENING = ("{\n", '  "hashes": [\n')
_CLOSING = "  ],\n"


def _known(path: Path, hashes: SortedHashes) -> tuple[Optional[list], bool]:
    """(the stores the ref at `path` lists, or None without one; does it list exactly `hashes`?)

    A ref in write_json's layout is compared a line at a time, so the file's hashes are never all
    Python objects at once; any other layout is parsed whole (as before)."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return None, False
    with handle:
        if tuple(handle.readline() for _ in _OPENING) == _OPENING:
            expected = iter(hashes)
            same = True
            for line in handle:
                if line == _CLOSING:
                    rest = json.loads("{" + handle.read())
                    return rest.get("stores"), same and next(expected, None) is None
                same = same and json.loads(line.rstrip().rstrip(",")) == next(expected, None)
        handle.seek(0)
        known = json.loads(handle.read())
    return known.get("stores"), known.get("hashes") == list(hashes)


def _write(path: Path, rest: dict, hashes: SortedHashes) -> None:
    """The same text as write_json(path, {"hashes": [...], **rest}), the hashes written a chunk at a time."""
    if not len(hashes):
        write_json(path, {"hashes": [], **rest})
        return
    tail = json.dumps(rest, indent=2, sort_keys=True, default=str)   # "{\n  "source": ..." : keys after "hashes"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("".join(_OPENING))
        separator = ""
        for part in hashes.chunks():
            out.write(separator + ",\n".join(f"    {json.dumps(h)}" for h in part))
            separator = ",\n"
        out.write("\n" + _CLOSING + tail[2:])


def live_refs(root: Path) -> tuple[list[dict], list[Path]]:
    """(refs whose dataset still exists, ref files whose dataset is gone)."""
    live, stale = [], []
    directory = refs_dir(root)
    if not directory.exists():
        return live, stale
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            stale.append(path)
            continue
        if Path(data["source"]).exists():
            live.append(data)
        else:
            stale.append(path)
    return live, stale
