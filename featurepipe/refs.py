"""What refers to cached features: each scanned dataset records its content hashes and the stores
it used, so `cache gc` can drop what nothing refers to any more."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from featurepipe.store import _write_json_atomic


def refs_dir(root: Path) -> Path:
    return root / "refs"


def record(root: Path, dataset, stores) -> None:
    directory = refs_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    source = str(Path(dataset.source).resolve())
    path = directory / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    fingerprints = sorted(set(known.get("stores", [])) | {s.fingerprint for s in stores})
    hashes = sorted(set(dataset.frame["hash"]))
    if known.get("hashes") == hashes and known.get("stores") == fingerprints:
        return
    _write_json_atomic(path, {"source": source, "hashes": hashes, "stores": fingerprints, "updated": time.time()})


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
