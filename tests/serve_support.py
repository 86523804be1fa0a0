"""What the serve tests share: a tiny evaluated run, and the real server (uvicorn) on 127.0.0.1 in a
thread, started on a free port, waited for with a deadline and always stopped."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from featurepipe.backbones.spec import BackboneSpec
from tests.conftest import COLOURS, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY2 = BackboneSpec(name="tiny2", weights="random", image_size=32)
START_SECONDS = 30


def make_run(base: Path, specs=(TINY,)) -> tuple[Path, Path, Path]:
    """(data, cache, run): 3 colour classes x 8 PNGs evaluated with logreg and 3-fold nested CV;
    two specs make the model a vote of one head per feature set."""
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate

    data, cache, run = base / "data", base / "cache", base / "run"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(data / name / f"{name}{i}.png", colour, seed=100 * c + i)
    evaluate(scan(data, cache_dir=cache), SearchConfig(specs=tuple(specs), heads=("logreg",), folds=3), cache,
             run_dir=run, n_jobs=1)
    return data, cache, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """The app served by uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_SECONDS
        while not server.started:
            assert thread.is_alive(), "the server thread ended before it started listening"
            assert time.monotonic() < deadline, f"the server did not start within {START_SECONDS} s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop within 15 s"
