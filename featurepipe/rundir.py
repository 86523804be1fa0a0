"""Run directories: what makes a folder a featurepipe run, and refusing to write into anyone else's.

`--run-dir` may name a new folder, an empty one, or an earlier run (which is updated in place).
A folder that already holds other files is refused unless the user passes --overwrite: writing a
run there would replace a config.json or leaderboard.csv of theirs and delete a model.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from featurepipe import atomic
from featurepipe.errors import FeaturepipeError

MARKER = ".featurepipe-run"


def is_run_dir(path: Path) -> bool:
    """A folder featurepipe made: its marker, or (runs made before the marker) a config.json of ours."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
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
