"""What refers to cached features: each scanned dataset records its content hashes and the stores
it used, so `cache gc` can drop what nothing refers to any more."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import pandas as pd

from featurepipe import columns
from featurepipe.atomic import atomic_path, write_json


def refs_dir(root: Path) -> Path:
    return root / "refs"


def record(root: Path, dataset, stores) -> None:
    directory = refs_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    source = str(Path(dataset.source).resolve())
    path = directory / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"
    hashes = sorted_hashes(dataset.frame["hash"])
    known_stores, same_hashes = _known(path, hashes)
    fingerprints = sorted(set(known_stores or []) | {s.fingerprint for s in stores})
    if same_hashes and known_stores == fingerprints:
        return
    _write(path, {"source": source, "stores": fingerprints, "updated": time.time()}, hashes)


def sorted_hashes(hashes: pd.Series) -> pd.Series:
    """The distinct hashes, sorted, as a compact column (a set and a sorted list of 70,000 Python
    strings cost ~15 MB, held while the file was compared)."""
    return hashes[~columns.duplicated(hashes)].sort_values(ignore_index=True)


# The layout atomic.write_json gives a ref (indent 2, sorted keys): "hashes" comes first, one per line.
_OPENING = ("{\n", '  "hashes": [\n')
_CLOSING = "  ],\n"


def _known(path: Path, hashes: pd.Series) -> tuple[Optional[list], bool]:
    """(the stores the ref at `path` lists, or None without one; does it list exactly `hashes`?)

    A ref in write_json's layout is compared a line at a time, so the file's hashes are never all
    Python objects at once; any other layout is parsed whole (as before)."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return None, False
    with handle:
        if tuple(handle.readline() for _ in _OPENING) == _OPENING:
            expected = columns.each(hashes)
            same = True
            for line in handle:
                if line == _CLOSING:
                    rest = json.loads("{" + handle.read())
                    return rest.get("stores"), same and next(expected, None) is None
                same = same and json.loads(line.rstrip().rstrip(",")) == next(expected, None)
        handle.seek(0)
        known = json.loads(handle.read())
    return known.get("stores"), known.get("hashes") == hashes.tolist()


def _write(path: Path, rest: dict, hashes: pd.Series) -> None:
    """The same text as write_json(path, {"hashes": [...], **rest}), the hashes written a chunk at a time."""
    if not len(hashes):
        write_json(path, {"hashes": [], **rest})
        return
    tail = json.dumps(rest, indent=2, sort_keys=True, default=str)   # "{\n  "source": ..." : keys after "hashes"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("".join(_OPENING))
        separator = ""
        for part in columns.chunks(hashes):
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
