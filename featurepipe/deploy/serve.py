"""`featurepipe serve`'s web application: a run's model behind a local page and a JSON endpoint.

Starlette (routing, multipart parsing through python-multipart) served by uvicorn: a small, well-kept
ASGI stack instead of a hand-rolled HTTP parser. The routes:

- `GET /`: one self-contained page (deploy.serve_page) to drop photos on;
- `POST /predict`: multipart files under `files` -> predict --json's fields per image plus `similar`;
- `GET /thumbnails/{id}`: a PNG of one of the run's training photos, by its id in the similar-photo
  index only, so no request can name a file (no path traversal);
- `GET /health`: the model, its classes and whether similar photos are available.

The model is loaded once, by `build_app`; predictions take a lock (the TensorFlow graphs and the
decode threads are shared, and one request at a time is what a local tool needs). Uploads are
copied into a private temporary folder that is deleted when the request ends (while parsing, Starlette
spools a part over 1 MB to an anonymous temporary file, gone when the form is closed); a request body over
the limit is refused with 413 before it is read whole, and a file that is not a usable image gets
an error naming the upload and the reason (predict's own decode errors), never a crash. Nothing here
prints: the CLI shows the notes `build_app` returns.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from featurepipe.core.errors import FeaturepipeError, UsageError
from featurepipe.core.progress import ProgressCallback
from featurepipe.core.strictjson import json_ready

DEFAULT_MAX_UPLOAD_MB = 25      # a camera photo is a few MB; the page sends one photo per request
MAX_FILES = 64                  # per request: more is a script, which can send several requests
TOP_K = 3


class UploadTooLarge(Exception):
    """A request body over the limit (answered 413)."""


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> Optional[str]:
    """What binding `host` exposes, when it is not a loopback address (None when it is)."""
    if is_loopback(host):
        return None
    return (f"serving on {host}, which other machines can reach: anyone who can connect can send images to the "
            f"model and see the run's training photos as thumbnails; use --host 127.0.0.1 to keep it on this machine")


@dataclass
class ServeState:
    """What every request shares: the predictor (behind its lock), the similar-photo index, the limits."""
    predictor: Any                                 # only Predictor's agreed API: predict, classes, nested_accuracy
    similar: Any                                   # deploy.similar.SimilarIndex
    max_upload_bytes: int
    run_dir: Path
    model_kind: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def limit_text(self) -> str:
        mb = self.max_upload_bytes / 2 ** 20
        return f"{mb:g} MB"

    def info(self) -> dict:
        """The run as the page and /health show it."""
        predictor = self.predictor
        return json_ready({
            "run": self.run_dir.name, "classes": list(predictor.classes), "model_kind": self.model_kind,
            "nested_accuracy": accuracy_info(predictor.nested_accuracy),
            "similar": {"available": self.similar.available, "feature_set": self.similar.feature_set,
                        "photos": len(self.similar.paths), "reason": self.similar.unavailable},
            "max_upload_mb": self.max_upload_bytes / 2 ** 20})

    def predict(self, files: list[tuple[str, Path]], top_k: int) -> tuple[int, dict]:
        """(HTTP status, JSON body) for the uploads `files` ((name, saved path)): 200 when any image was
        classified, 422 naming every upload and its reason when none was."""
        by_path = {os.path.abspath(path): name for name, path in files}
        with self.lock:
            result = self.predictor.predict([str(path) for _, path in files], top_k=top_k,
                                            keep_features=self.similar.available)
        body = result.to_dict()
        body.pop("run_dir", None)      # the server's folder layout is none of a client's business
        features = (getattr(result, "features", None) or {}).get(self.similar.feature_set)
        ok = [row for row in body["predictions"] if not row.get("error")]
        neighbours = self.similar.query(features) if features is not None and len(features) == len(ok) else []
        found = iter(neighbours)
        for row in body["predictions"]:
            row["path"] = by_path.get(os.path.abspath(row["path"]), row["path"])
            if row.get("error"):
                row["similar"] = []
            else:
                row["similar"] = [{"path": self.similar.name(i), "label": self.similar.labels[i],
                                   "similarity": round(s, 6), "thumbnail": f"/thumbnails/{i}"}
                                  for i, s in next(found, [])]
        body["similar_unavailable"] = None if neighbours else (self.similar.unavailable or "no features to compare")
        if not ok:
            reasons = "; ".join(f"{row['path']}: {row['error']}" for row in body["predictions"])
            return 422, {"error": f"no upload could be classified: {reasons}", **body}
        return 200, body


def accuracy_info(value) -> Optional[dict]:
    """The nested-CV accuracy as {mean, low, high} (None when the run has none), from a number or a
    nested.json-style {mean, ci_low, ci_high} dict."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return {"mean": float(value), "low": None, "high": None}
    if isinstance(value, dict):
        mean = value.get("mean", value.get("accuracy"))
        if mean is None:
            return None
        return {"mean": float(mean), "low": value.get("ci_low", value.get("low")),
                "high": value.get("ci_high", value.get("high"))}
    return None


# ------------------------------------------------------------------------------------------ building


def build_app(run_dir: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None, model: Optional[str] = None,
              trust: bool = False, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
              progress: Optional[ProgressCallback] = None):
    """(Starlette app, notes): the run's model loaded once and warmed up, its similar-photo index read."""
    from featurepipe.deploy.predictor import Predictor

    if not max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be above 0, not {max_upload_mb}")
    predictor = Predictor(run_dir, cache_dir=cache_dir, model=model, trust=trust, progress=progress)
    warm = _warm_up(predictor)
    feature_sets = list(getattr(warm, "features", None) or {})
    from featurepipe.deploy.similar import SimilarIndex, load_similar

    try:
        similar = load_similar(run_dir, feature_sets[0] if feature_sets else None, cache_dir)
    except (FeaturepipeError, OSError) as error:   # the page still predicts without them
        similar = SimilarIndex(unavailable=f"cannot read the run's training features: {error}")
    state = ServeState(predictor, similar, int(max_upload_mb * 2 ** 20), Path(run_dir), warm.model_kind)
    if not similar.available:
        state.notes.append(f"similar photos are unavailable: {similar.unavailable}")
    return create_app(state), state.notes


def _warm_up(predictor):
    """One image of noise through the model, so the first request does not pay for building the
    networks; its result says which model answers (model_kind) and which feature sets it computes
    (its features' keys). Noise drawn afresh: the Predictor keeps an image's features in the cache,
    so a fixed image would be found there from the second start on and build nothing."""
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="featurepipe-serve-"))
    try:
        path = folder / "warm-up.png"
        Image.fromarray(np.random.default_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        return predictor.predict([str(path)], top_k=1, keep_features=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_app(state: ServeState):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    routes = [Route("/", _page, methods=["GET"]), Route("/health", _health, methods=["GET"]),
              Route("/predict", _predict, methods=["POST"]),
              Route("/thumbnails/{photo:int}", _thumbnail, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, UploadTooLarge: _too_large})
    app.state.serve = state
    return app


# ------------------------------------------------------------------------------------------ routes


def _json(body: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(json_ready(body), status_code=status)


async def _http_error(request, error):
    return _json({"error": f"{request.url.path}: {error.detail}"}, error.status_code)


async def _too_large(request, error):
    return _json({"error": str(error)}, 413)


async def _page(request):
    from starlette.responses import HTMLResponse

    from featurepipe.deploy.serve_page import page

    return HTMLResponse(page(request.app.state.serve.info()))


async def _health(request):
    return _json({"status": "ok", **request.app.state.serve.info()})


async def _thumbnail(request):
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    from featurepipe.core.errors import ImageDecodeError

    state: ServeState = request.app.state.serve
    photo = request.path_params["photo"]
    try:
        png = await run_in_threadpool(state.similar.thumbnail, photo)
    except IndexError:
        return _json({"error": f"no training photo {photo}: ids come from /predict's `similar` "
                               f"(0 to {len(state.similar.paths) - 1})"}, 404)
    except (ImageDecodeError, OSError) as error:
        return _json({"error": f"training photo {photo} cannot be shown: {error}"}, 404)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def _predict(request):
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    state: ServeState = request.app.state.serve
    try:
        top_k = int(request.query_params.get("top", TOP_K))
    except ValueError:
        top_k = 0
    if top_k < 1:
        return _json({"error": f"top must be a whole number of at least 1, not {request.query_params.get('top')!r}"}, 400)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > state.max_upload_bytes:
        raise UploadTooLarge(_too_large_text(state, int(declared)))
    capped = Request(request.scope, _capped(request.receive, state))
    form = await capped.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    folder = Path(tempfile.mkdtemp(prefix="featurepipe-serve-"))     # mode 0700: this user's only
    try:
        uploads = [item for item in form.getlist("files") if hasattr(item, "filename")]
        if not uploads:
            return _json({"error": "no files: send one or more images as multipart/form-data under the field `files`"}, 400)
        saved = await run_in_threadpool(_save, uploads, folder)
        status, body = await run_in_threadpool(state.predict, saved, top_k)
        return _json(body, status)
    finally:
        await form.close()
        shutil.rmtree(folder, ignore_errors=True)


def _too_large_text(state: ServeState, size: Optional[int] = None) -> str:
    got = f" ({size / 2 ** 20:.1f} MB)" if size else ""
    return (f"upload too large{got}: the limit is {state.limit_text} per request (serve --max-upload-mb); "
            f"send fewer or smaller images per request")


def _capped(receive, state: ServeState):
    """`receive` that raises UploadTooLarge once the body passes the limit (a body without a length, or lying about it)."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > state.max_upload_bytes:
                raise UploadTooLarge(_too_large_text(state))
        return message
    return wrapped


_UNSAFE = re.compile(r"[^A-Za-z0-9.]")


def _save(uploads, folder: Path) -> list[tuple[str, Path]]:
    """Each upload copied to folder/<n><suffix> (a name of ours: the client's name is only echoed back)."""
    saved = []
    for index, upload in enumerate(uploads):
        name = upload.filename or f"upload {index + 1}"
        suffix = _UNSAFE.sub("", Path(name).suffix)[:10]
        path = folder / f"{index:03d}{suffix}"
        upload.file.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
        saved.append((name, path))
    return saved
