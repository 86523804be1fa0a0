"""The run folder itself: what makes a folder a run (its marker), its name, where runs go by default,
reading its JSON files, and the runs under a cache.

`--run-dir` may name a new folder, an empty one, or an earlier run (which is updated in place).
A folder that already holds other files is refused unless the user passes --overwrite: writing a
run there would replace a config.json or leaderboard.csv of theirs and delete a model.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from featurepipe.core import atomic
from featurepipe.core.cachedirs import runs_dir
from featurepipe.core.errors import FeaturepipeError
from featurepipe.rundir.layout import CONFIG, MARKER


def read_json(path: Path, missing: Optional[str] = None, fix: str = "`featurepipe evaluate`") -> Any:
    """A JSON file of the run. `missing`: the message when it does not exist (else the OSError's);
    a file that cannot be read or parsed names itself and `fix`, the command that writes it again."""
    path = Path(path)
    if missing is not None and not path.exists():
        raise FeaturepipeError(missing)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FeaturepipeError(f"{path} is damaged or unreadable ({error}); re-run {fix}") from None


def is_run_dir(path: Path) -> bool:
    """A folder featurepipe made: its marker, or (runs made before the marker) a config.json of ours."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "feature_fingerprints" in config and "backbone" in config


def prepare_run_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create (or accept) the run folder `path` and mark it as a run; refuse a folder with other
    people's files in it unless `overwrite`."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FeaturepipeError(f"--run-dir {path} is a file; give a folder for the run")
    if path.is_dir() and not overwrite and not is_run_dir(path) and any(path.iterdir()):
        raise FeaturepipeError(
            f"--run-dir {path} already holds files and is not a featurepipe run; writing a run there would replace "
            f"files such as config.json or leaderboard.csv. Pick a new or empty folder, or pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        atomic.write_json(path / MARKER, {"featurepipe": "run", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


# File systems refuse names over 255 bytes; the date, a uniqueness suffix and the temporary names
# beside a run (".tmp-<12 hex>-...") must fit too. Longer dataset names keep their start and gain a
# digest of the whole, so two long names that share a start still name different folders.
MAX_NAME_CHARS = 100


def dated_name(source: str | os.PathLike, label: str) -> str:
    """<date-time>-<dataset folder>-<label>, safe as a folder name (ASCII, at most MAX_NAME_CHARS after
    the date): how runs (and inspections) are named."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(source).stem}-{label}")
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:30]
        name = f"{name[:MAX_NAME_CHARS - len(tail) - 12]}-{digest}-{tail}"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def default_run_dir(root: Path, source: str | os.PathLike, label: str) -> Path:
    """CACHE/runs/<date-time>-<dataset folder>-<label>: where a run goes without --run-dir (the name
    planned; `claim_new_dir` makes it this process's own)."""
    return runs_dir(root) / dated_name(source, label)


def claim_new_dir(path: Path) -> Path:
    """Create `path`, or `path-2`, `path-3`... when it is taken, exclusively (mkdir fails when the name
    exists): two runs started in the same second each get a folder of their own, never one shared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FeaturepipeError(f"{path.parent} holds 10,000 runs named {path.name}-N; pass --run-dir")


def new_run_dir(root: Path, source: str | os.PathLike, label: str,
                explicit: Optional[str | os.PathLike] = None) -> Path:
    """The run folder a stage writes: `explicit` (--run-dir) or a new default one of its own, prepared
    (marked; a user's non-run folder refused)."""
    if explicit is not None:
        return prepare_run_dir(Path(explicit))
    return prepare_run_dir(claim_new_dir(default_run_dir(root, source, label)))


def run_configs(root: Path) -> Iterable[tuple[Path, dict]]:
    """(run dir, config.json) of every readable run under the cache's runs/ folder."""
    for path in sorted(runs_dir(root).glob(f"*/{CONFIG}")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            yield path.parent, data


def fingerprints_used_by_runs(root: Path) -> set[str]:
    """The feature stores the runs under the cache read (config.json's feature_fingerprints)."""
    used: set[str] = set()
    for _, config in run_configs(root):
        used.update(config.get("feature_fingerprints", []))
    return used
