"""A quiet start: TensorFlow's native libraries print start-up lines that no setting turns off.

When TensorFlow loads, two of its shared libraries each log "oneDNN custom operations are on ..."
through absl before absl is initialised, so TF_CPP_MIN_LOG_LEVEL (read later, by TensorFlow's
own log sink) cannot hide them; GPU builds add "Unable to register cuDNN factory" and friends.
The only off switch, TF_ENABLE_ONEDNN_OPTS=0, also changes which kernels run and so the numbers,
and is therefore left alone.

`quiet_tensorflow_startup()` makes the first `import tensorflow` (direct, or through keras) run
with file descriptor 2 going through a filter that drops exactly those known lines and passes
everything else through as it arrives, so a real error during the import is still seen. The CLI
calls it unless `--verbose` is given; library code never does (importing featurepipe changes
nothing in the caller's process). The Dask workers that `--workers N` starts run this module as a
preload (`dask_setup`, see cli/worker_start.py) so that their TensorFlow starts as quietly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

# Lines TensorFlow's native start-up prints that say nothing about the user's job.
STARTUP_NOISE = re.compile(
    r"oneDNN custom operations are on"
    r"|All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions: .*rebuild TensorFlow"
    r"|Unable to register cu(?:DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc.*already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
)


# True once quiet_tensorflow_startup() was called in this process.
_ACTIVE = False


def is_startup_noise(line: str) -> bool:
    return bool(STARTUP_NOISE.search(line))


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Route file descriptor 2 (native code writes there directly) through `is_startup_noise`."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no usable stderr (closed, or a GUI process)
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not is_startup_noise(line.decode("utf-8", errors="replace")):
                    os.write(saved, line)

    reader = threading.Thread(target=pump, name="featurepipe-stderr-filter", daemon=True)
    reader.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)          # drops the pipe's last write end: the reader sees EOF
        reader.join(timeout=10)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` inside `filtered_stderr`, then gets out of the way."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        # Whatever later looks at the module's loader sees TensorFlow's own.
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        with filtered_stderr():
            self._inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Catches the first import of `tensorflow` (one-shot: removes itself when it fires)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_startup() -> None:
    """Hide TensorFlow's start-up lines for this process (a no-op once TensorFlow is imported)."""
    global _ACTIVE
    _ACTIVE = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())


def quiet_active() -> bool:
    """Whether this process hides TensorFlow's start-up lines (the CLI without --verbose)."""
    return _ACTIVE


def dask_setup(worker) -> None:
    """As a Dask worker preload: the worker's TensorFlow starts quietly too."""
    quiet_tensorflow_startup()
