"""The run folder itself: what makes a folder a run (its marker), its name, where runs go by default,
reading its JSON files, the runs under a cache, each dataset's latest run (CACHE/runs/latest-*.json,
which `predict DATA` and a no-change re-run follow) and the cache a run uses once moved with it.

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
from featurepipe.core.cachedirs import RUNS, runs_dir
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


# ---- the latest run of each dataset, and runs that moved with their cache

# CACHE/runs/latest-<dataset>-<8 hex>.json names the newest run `run` wrote for one dataset (a JSON
# file, not a symlink: it survives copying, zipping and Windows, and cannot point outside runs/).
# The digest is of the dataset's resolved path: two datasets both called "data" keep two pointers.
LATEST_PREFIX = "latest-"


def latest_pointer(root: Path, source: str | os.PathLike) -> Path:
    """CACHE/runs/latest-<dataset>-<digest>.json: the pointer to DATA's latest run."""
    resolved = Path(source).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", resolved.stem)[:MAX_NAME_CHARS] or "data"
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return runs_dir(root) / f"{LATEST_PREFIX}{name}-{tag}.json"


def write_latest(root: Path, source: str | os.PathLike, run_path: Path, key: str) -> Path:
    """Point DATA's latest pointer at `run_path` (a folder in CACHE/runs), with the reuse key of what
    it holds (the dataset's content and the search; see pipeline.run)."""
    pointer = latest_pointer(root, source)
    resolved = Path(source).expanduser().resolve()
    atomic.write_json(pointer, {"run": Path(run_path).name, "source": str(resolved),
                                "source_from_cache": os.path.relpath(resolved, Path(root).resolve()),
                                "key": key, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return pointer


def _read_pointer(pointer: Path) -> Optional[dict]:
    try:
        data = json.loads(pointer.read_text())
    except (OSError, ValueError):
        return None
    # Only a bare folder name is followed: a pointer never leads outside CACHE/runs.
    if not isinstance(data, dict) or not isinstance(data.get("run"), str) or Path(data["run"]).name != data["run"]:
        return None
    return data


def _pointer_for(root: Path, source: str | os.PathLike) -> Optional[dict]:
    """DATA's pointer: the one for its path, else (a project copied or moved with its cache) one
    written for the same place relative to the cache (e.g. ../data beside cache/)."""
    data = _read_pointer(latest_pointer(root, source))
    if data is not None:
        return data
    relative = os.path.relpath(Path(source).expanduser().resolve(), Path(root).resolve())
    for pointer in sorted(runs_dir(root).glob(f"{LATEST_PREFIX}*.json")):
        data = _read_pointer(pointer)
        if data is not None and data.get("source_from_cache") == relative:
            return data
    return None


def _finished(path: Path) -> bool:
    from featurepipe.rundir.layout import HEAD_META

    return path.is_dir() and (path / CONFIG).is_file() and (path / HEAD_META).is_file()


def reusable_run(root: Path, source: str | os.PathLike, key: str) -> Optional[Path]:
    """DATA's latest run when it was made from the same content and search (`key` equal) and is
    finished; else None (a new run folder is made)."""
    data = _pointer_for(root, source)
    if data is None or data.get("key") != key:
        return None
    path = runs_dir(root) / data["run"]
    return path if _finished(path) else None


def latest_pointers(root: Path) -> dict[Path, Path]:
    """pointer file -> the run folder it names, for every readable latest pointer under the cache."""
    pointers = {}
    for pointer in sorted(runs_dir(root).glob(f"{LATEST_PREFIX}*.json")):
        data = _read_pointer(pointer)
        if data is not None:
            pointers[pointer] = runs_dir(root) / data["run"]
    return pointers


def latest_run(root: Path, source: str | os.PathLike) -> Optional[Path]:
    """DATA's latest finished run under the cache: the one its pointer names, else (runs made before
    pointers, or by `evaluate`) the newest whose config.json records DATA as its dataset."""
    data = _pointer_for(root, source)
    if data is not None and _finished(runs_dir(root) / data["run"]):
        return runs_dir(root) / data["run"]
    resolved = str(Path(source).expanduser().resolve())
    mine = [path for path, config in run_configs(root)
            if (config.get("dataset") or {}).get("source") == resolved and _finished(path)]
    return max(mine, key=lambda p: (p / CONFIG).stat().st_mtime, default=None)


def resolve_run_arg(path: str | os.PathLike, root: Path) -> tuple[Path, Optional[str]]:
    """What `predict` / `export` / `report` take as RUN: a run directory as it is, or DATA (a dataset
    folder or manifest) as that dataset's latest run under the cache `root`, with a note saying which.
    A dataset with no run is an error that lists the runs there are; anything else is returned as it
    is (Run.open then says what is wrong with it)."""
    path = Path(path).expanduser()
    if not path.exists() or is_run_dir(path) or (path / CONFIG).exists():
        return path, None
    found = latest_run(root, path)
    if found is not None:
        return found, f"using {found}, the latest run of {path}"
    runs = sorted(p.name for p, _ in run_configs(root))
    listed = ("; the runs there: " + ", ".join(runs[-10:]) + (f" (and {len(runs) - 10} more)" if len(runs) > 10 else "")
              if runs else "; it holds no runs")
    raise FeaturepipeError(f"{path} is not a run directory and no run of it was found in {runs_dir(root)}{listed}. "
                           f"Run `featurepipe run {path}` first, or pass a run directory (or --cache-dir, the cache "
                           f"the run was made in)")


def run_cache_root(run_path: str | os.PathLike, recorded: Optional[str],
                   override: Optional[str | os.PathLike] = None) -> tuple[Optional[str | os.PathLike], Optional[str]]:
    """(the cache root a run uses, a note or warning about it, else None).

    config.json records the cache as an absolute path (runs written before still work). A run that
    lives in CACHE/runs/<name> of another featurepipe cache (the project was copied or moved) uses
    the cache it lives in: reading the recorded one would silently read, and write, the original's.
    A run elsewhere whose recorded cache is missing, or not the cache of the current folder, keeps
    the recorded one with a warning naming both. `override` (--cache-dir) is taken as it is."""
    from featurepipe.core.cachedirs import CACHE_ENV, is_cache_root
    from featurepipe.rundir.layout import MEMBERS_DIR

    if override is not None or not recorded:
        return override, None
    run = Path(run_path).expanduser().resolve()
    if run.parent.name == MEMBERS_DIR:          # a vote member: the run is two folders up
        run = run.parent.parent
    recorded_path = Path(recorded).expanduser().resolve()
    home = run.parent.parent
    if run.parent.name == RUNS and home != recorded_path and is_cache_root(home):
        return home, (f"{run.name} was made with the cache {recorded_path}; it lives in the cache {home}, "
                      f"which is used (pass --cache-dir to choose)")
    if not recorded_path.is_dir():   # (not the marker: caches older than it have none)
        return recorded, (f"{run} records the cache {recorded_path}, which does not exist (moved or deleted?): "
                          f"features are computed there again; pass --cache-dir to use another")
    here = Path(os.environ.get(CACHE_ENV) or "cache").expanduser().resolve()
    if here != recorded_path and is_cache_root(here) and run.parent.name != "runs":
        return recorded, (f"{run} records the cache {recorded_path}, not {here} (the cache here); using the "
                          f"recorded one (pass --cache-dir {here} to use this one)")
    return recorded, None
