"""SIGKILL a real `finetune` process at chosen points, then `--resume`: it must always finish.

Each kill point is made deterministic: the child pauses right there (after printing a marker) and
the test kills it with SIGKILL while it waits. The points cover the window before state.json
exists, mid-epoch, inside the write of the epoch backup and of the best weights (the temporary
file is written, the rename has not happened: Keras's in-place BackupAndRestore left a half file
here that broke every later resume), inside the final model save and between summary and state.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.training.finetune import finetune
from featurepipe.training.keras_fit import read_history
from featurepipe.training.config import FinetuneConfig
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, REPO, make_image

pytestmark = pytest.mark.slow

SPEC = BackboneSpec(name="tiny", weights="random", image_size=32)
OPTIONS = dict(epochs=3, batch_size=8, lr=1e-3, patience=10, seed=0)

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import keras, numpy as np
    import tests.tiny_backbone
    import featurepipe.training.finetune as ft
    import featurepipe.training.checkpoints as ck
    from featurepipe.training.config import FinetuneConfig

    run, point = Path(sys.argv[1]), sys.argv[2]

    def pause(marker):
        print(marker, flush=True)
        time.sleep(120)

    def wrap(owner, name, when):
        original = getattr(owner, name)
        def wrapper(*args, **kwargs):
            if when == "before":
                pause(point)
            value = original(*args, **kwargs)
            if when(*args, **kwargs) if callable(when) else when == "after":
                pause(point)
            return value
        setattr(owner, name, wrapper)

    if point == "before-state":
        wrap(ft, "make_split", "after")
    elif point == "backup-write":      # epoch 1's backup file written under its temporary name
        wrap(keras.Model, "save_weights", lambda self, path, *a, **k: "epoch-0001" in str(path))
    elif point == "best-write":        # the first best-weights .npz written, not yet renamed
        wrap(np, "savez", "after")
    elif point == "final-save":        # finetuned.keras saved, summary.json not written
        wrap(ft, "save_model_atomic", "after")
    elif point == "before-done":       # summary.json written, state.json still "running"
        wrap(ft, "_publish", "before")

    class MidEpoch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if point == "mid-epoch" and self._epoch == 1 and batch == 0:
                pause(point)
        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    ft.finetune(run, FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, patience=10, seed=0), callbacks=[MidEpoch()])
    print("FINISHED", flush=True)
    """
)
# "final-save" (finetuned.keras written, summary not) also passes; left out to keep the suite short.
POINTS = ["before-state", "mid-epoch", "best-write", "backup-write", "before-done"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_kill")
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(root / "data" / name / f"{name}{i}.png", colour, seed=100 * c + i)
    evaluate(scan(root / "data", cache_dir=root / "cache"), SearchConfig(specs=(SPEC,), heads=("logreg",), folds=2),
             root / "cache", run_dir=root / "run", n_jobs=1)
    return root / "run"


def _kill_at(run, point: str, timeout: float = 120) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), point], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline and child.poll() is None:
            ready, _, _ = select.select([child.stdout], [], [], 1.0)
            if ready:
                line = child.stdout.readline().strip()
                seen.append(line)
                if line == point:
                    break
        if point not in seen:
            child.kill()
            _, err = child.communicate(timeout=30)
            raise AssertionError(f"the child never reached {point!r} (rc={child.returncode}, printed {seen})\n"
                                 f"{err[-3000:]}")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            stream.close()


@pytest.mark.parametrize("point", POINTS)
def test_resume_finishes_after_a_kill(evaluated, tmp_path, point):
    run = shutil.copytree(evaluated, tmp_path / "run")
    _kill_at(run, point)
    out = run / "finetune"
    if point != "before-state":
        assert json.loads((out / "state.json").read_text())["status"] == "running"

    result = finetune(run, FinetuneConfig(resume=True, **OPTIONS))

    assert json.loads((out / "state.json").read_text())["status"] == "done"
    assert read_history(out / "history.csv")["epoch"].tolist() == [0, 1, 2] and result.epochs_run == 3
    assert not (out / "backup").exists() and not list(out.rglob(".tmp-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["key"] == result.key and summary["epochs"] == 3
    import featurepipe.heads.to_keras  # noqa: F401  (custom layers for the safe_mode load)

    model = keras.saving.load_model(out / "finetuned.keras", safe_mode=True)
    assert model.output_shape == (None, 3)
    if point == "before-state":
        assert result.notes and "started over" in result.notes[0]


def test_a_damaged_backup_is_detected_and_the_run_starts_over(evaluated, tmp_path):
    """Bytes flipped in the last epoch's backup (a disk fault, not a kill): it is never loaded."""
    run = shutil.copytree(evaluated, tmp_path / "run")

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(run, FinetuneConfig(**OPTIONS), callbacks=[Stop()])
    backup = run / "finetune" / "backup" / "finetune"
    latest = json.loads((backup / "latest.json").read_text())
    assert latest["epoch"] == 1
    path = backup / latest["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    result = finetune(run, FinetuneConfig(resume=True, **OPTIONS))
    assert "backup is damaged" in result.notes[0] and "started over" in result.notes[0]
    assert result.epochs_run == 3 and result.resumed_from_epoch is None
