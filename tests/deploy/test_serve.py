"""serve: the real server on 127.0.0.1 (uvicorn in a thread) answering the page, /predict, /health and
thumbnails; the numbers are checked against `predict` and against cosine similarities recomputed
with scikit-learn from the store's own features."""

import dataclasses
import http.client
import io
import json
import re
import shutil
import threading
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from featurepipe.data import images as images_module  # noqa: E402
from featurepipe.data.dataset import scan  # noqa: E402
from featurepipe.deploy.predict import predict  # noqa: E402
from featurepipe.deploy.serve import build_app, create_app, exposure_warning, is_loopback  # noqa: E402
from featurepipe.extraction.extract import open_stores  # noqa: E402
from featurepipe.extraction.features import dataset_features  # noqa: E402
from tests.conftest import COLOURS, make_image  # noqa: E402
from tests.serve_support import TINY, make_run, serving  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def app(trained):
    app, notes = build_app(trained[2])
    assert notes == []
    return app


@pytest.fixture(scope="module")
def server(app):
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _upload(*files):
    return [("files", (name, data, "application/octet-stream")) for name, data in files]


def _png(path) -> bytes:
    return path.read_bytes()


def _proba(row_or_frame, classes):
    return np.array([row_or_frame[f"p[{c}]"] for c in classes], dtype=float)


# ------------------------------------------------------------------------------------------ page, health


def test_health_and_the_page_are_self_contained_and_name_the_run(server, trained):
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == ["blue", "green", "red"]
    assert health["model_kind"] == "head"
    assert health["similar"] == {"available": True, "feature_set": "tiny/squash", "photos": 24, "reason": None}
    nested = json.loads((trained[2] / "nested.json").read_text())["accuracy"]
    assert health["nested_accuracy"] == {"mean": nested["mean"], "low": nested["ci_low"], "high": nested["ci_high"]}

    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<input id="files" type="file"' in html
    # nothing from the network: no absolute URL anywhere, every src/href inline or relative
    assert "://" not in html
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", html)
    assert '"run": "run"' in html


def test_loopback_hosts_and_the_warning_for_others():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.org"))
    assert exposure_warning("127.0.0.1") is None
    assert "0.0.0.0" in exposure_warning("0.0.0.0") and "--host 127.0.0.1" in exposure_warning("0.0.0.0")


# ------------------------------------------------------------------------------------------ predictions


def test_predictions_equal_predict_on_the_same_files(server, trained, tmp_path):
    new = tmp_path / "new"
    files = [make_image(new / "a_red.png", COLOURS["red"], seed=4242, size=(57, 31)),
             make_image(new / "b_blue.jpg", COLOURS["blue"], seed=4343, size=(40, 64))]
    answer = server.post("/predict", files=_upload(*[(f.name, _png(f)) for f in files]))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    result = predict(trained[2], files)
    expected = result.to_dict()
    assert {k: body[k] for k in ("model_kind", "classes", "top_k", "images", "failed")} == \
        {k: expected[k] for k in ("model_kind", "classes", "top_k", "images", "failed")}
    assert [row["path"] for row in body["predictions"]] == ["a_red.png", "b_blue.jpg"]
    for got, want in zip(body["predictions"], expected["predictions"]):
        assert list(got) == list(want) + ["similar"]            # predict --json's fields, then `similar`
        np.testing.assert_allclose(_proba(got, body["classes"]), _proba(want, body["classes"]), rtol=0, atol=1e-6)
        assert [got[f"label_{i}"] for i in (1, 2, 3)] == [want[f"label_{i}"] for i in (1, 2, 3)]
        assert got["error"] is None and len(got["similar"]) == 5
    assert [row["label"] for row in body["predictions"]] == ["red", "blue"]
    assert server.post("/predict?top=1", files=_upload(("a.png", _png(files[0])))).json()["top_k"] == 1
    assert server.post("/predict?top=0", files=_upload(("a.png", _png(files[0])))).status_code == 400


def test_similar_photos_are_the_cosine_nearest_training_photos(server, trained):
    from sklearn.metrics.pairwise import cosine_similarity

    data, cache, _ = trained
    features = dataset_features(scan(data, cache_dir=cache), open_stores(TINY, cache))
    paths = [p.replace(str(data) + "/", "") for p in features.frame["path"]]
    scores = cosine_similarity(features.X)
    for query in (3, 13, 22):      # a training photo sent back: its own features are in the store
        body = server.post("/predict", files=_upload(("q.png", (data / paths[query]).read_bytes()))).json()
        similar = body["predictions"][0]["similar"]
        order = np.argsort(-scores[query], kind="stable")[:5]
        assert [s["path"] for s in similar] == [paths[j] for j in order]
        np.testing.assert_allclose([s["similarity"] for s in similar], scores[query, order], atol=1e-5)
        assert similar[0]["path"] == paths[query] and similar[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
        assert [s["label"] for s in similar] == [p.split("/")[0] for p in [paths[j] for j in order]]
        png = server.get(similar[1]["thumbnail"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(png.content)) as thumb, Image.open(data / similar[1]["path"]) as original:
            assert max(thumb.size) <= 160 and thumb.size == original.size   # 48x40: smaller than a thumbnail


# ------------------------------------------------------------------------------------------ bad uploads


def test_bad_uploads_get_4xx_json_naming_the_upload_and_the_reason(server, trained, monkeypatch, tmp_path):
    data = trained[0]
    png = _png(data / "red" / "red1.png")
    cases = {
        "page.jpg": (b"<html><body>404 not found</body></html>", "text"),
        "cut.png": (png[: len(png) // 3], "truncated or corrupt"),
        "empty.png": (b"", "empty file"),
    }
    for name, (content, reason) in cases.items():
        answer = server.post("/predict", files=_upload((name, content)))
        assert answer.status_code == 422, (name, answer.text)
        error = answer.json()["error"]
        assert name in error and reason in error, error
    # A new image (a training one's features are read from the store, never decoded again).
    bomb = _png(make_image(tmp_path / "bomb.png", COLOURS["red"], seed=991))
    monkeypatch.setattr(images_module, "MAX_PIXELS", 1000)       # 48 x 40 = 1,920 pixels: a "bomb" now
    answer = server.post("/predict", files=_upload(("bomb.png", bomb)))
    assert answer.status_code == 422 and "bomb.png" in answer.json()["error"]
    assert "image too large" in answer.json()["error"]


def test_one_bad_file_fails_only_itself(server, trained):
    data = trained[0]
    answer = server.post("/predict", files=_upload(("green.png", _png(data / "green" / "green2.png")),
                                                   ("notes.txt", b"just text"),
                                                   ("blue.png", _png(data / "blue" / "blue5.png"))))
    assert answer.status_code == 200
    rows = answer.json()["predictions"]
    assert [r["path"] for r in rows] == ["green.png", "notes.txt", "blue.png"]
    assert [r["label"] for r in rows] == ["green", None, "blue"]
    assert rows[1]["error"].startswith("not a recognised image format") and rows[1]["similar"] == []
    assert answer.json()["failed"] == 1


def test_requests_without_files_are_refused(server):
    assert server.post("/predict", json={"files": "x"}).status_code == 400
    none = server.post("/predict", data={"other": "field"})
    assert none.status_code == 400 and "`files`" in none.json()["error"]
    assert server.get("/predict").status_code == 405


def test_uploads_over_the_limit_get_413_with_the_limit_and_the_server_goes_on(app, trained):
    small = create_app(dataclasses.replace(app.state.serve, max_upload_bytes=2 ** 18))   # 0.25 MB
    big = np.random.default_rng(0).integers(0, 255, 400_000, dtype=np.uint8).tobytes()
    with serving(small) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/predict", files=_upload(("big.png", big)))
        assert answer.status_code == 413
        assert "0.25 MB" in answer.json()["error"] and "--max-upload-mb" in answer.json()["error"]

        # No Content-Length (chunked): refused while it is read, past the limit.
        boundary = "fpboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode()

        def body():
            yield head
            for start in range(0, len(big), 65536):
                yield big[start:start + 65536]
            yield f"\r\n--{boundary}--\r\n".encode()
        chunked = client.post("/predict", content=body(),
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert chunked.status_code == 413 and "0.25 MB" in chunked.json()["error"]

        ok = client.post("/predict", files=_upload(("red.png", _png(trained[0] / "red" / "red3.png"))))
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "red"


# ------------------------------------------------------------------------------------------ thumbnails


def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (an HTTP client would normalise the dot segments away)."""
    url = urlparse(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_thumbnails_only_by_id_never_by_path(server, trained):
    base = str(server.base_url).rstrip("/")
    status, png = _raw_get(base, "/thumbnails/0")
    assert status == 200 and png.startswith(b"\x89PNG")
    config = (trained[2] / "config.json").read_bytes()
    for path in ("/thumbnails/24", "/thumbnails/-1", "/thumbnails/../config.json", "/thumbnails/..%2Fconfig.json",
                 "/thumbnails/%2e%2e/%2e%2e/etc/passwd", "/thumbnails//etc/passwd", "/thumbnails/0/../../run/config.json",
                 "/thumbnails/red/red0.png", "/thumbnails?path=/etc/passwd", "/thumbnails/1e3", "/../../etc/passwd"):
        status, body = _raw_get(base, path)
        assert status == 404, (path, status)
        assert b"root:" not in body and config[:40] not in body and not body.startswith(b"\x89PNG"), path
    assert "0 to 23" in server.get("/thumbnails/24").json()["error"]


# ------------------------------------------------------------------------------------------ concurrency


def test_concurrent_requests_are_serialized_and_each_gets_its_own_answer(server, trained):
    data = trained[0]
    names = ["red/red0.png", "green/green1.png", "blue/blue2.png", "red/red5.png"]
    results: dict[int, tuple] = {}

    def send(index: int) -> None:
        name = names[index % len(names)]
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            answer = client.post("/predict", files=_upload((f"{index}.png", (data / name).read_bytes())))
        row = answer.json()["predictions"][0]
        results[index] = (answer.status_code, row["path"], row["label"], row["similar"][0]["path"])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(8))
    for index, (status, path, label, nearest) in results.items():
        name = names[index % len(names)]
        assert (status, path, label, nearest) == (200, f"{index}.png", name.split("/")[0], name)


# ------------------------------------------------------------------------------------------ without the cache


def test_without_the_runs_cache_the_page_says_similar_photos_are_unavailable(trained, tmp_path):
    data, cache, run = trained
    gone = tmp_path / "gone-cache"
    app, notes = build_app(run, cache_dir=gone)
    assert len(notes) == 1 and "similar photos are unavailable" in notes[0] and "gone" in notes[0]
    assert not (gone / "features").exists()                       # nothing was created in its place
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert "Similar training photos are unavailable" in client.get("/").text
        assert client.get("/health").json()["similar"]["available"] is False
        answer = client.post("/predict", files=_upload(("g.png", _png(data / "green" / "green4.png"))))
        assert answer.status_code == 200
        body = answer.json()
        assert body["predictions"][0]["label"] == "green" and body["predictions"][0]["similar"] == []
        assert "gone" in body["similar_unavailable"]
        assert client.get("/thumbnails/0").status_code == 404


def test_a_moved_dataset_leaves_predictions_working(trained, tmp_path):
    data, cache, run = trained
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["dataset"]["source"] = str(tmp_path / "no-such-data")
    from featurepipe.core import trust

    (moved / "config.json").write_text(json.dumps(trust.with_record_signature("config.json", config)))
    app, notes = build_app(moved)
    assert any("dataset" in n and "gone" in n for n in notes), notes


def test_the_page_embeds_names_as_data_never_as_markup_and_reads_any_accuracy_shape():
    from featurepipe.deploy.serve import accuracy_info
    from featurepipe.deploy.serve_page import page

    hostile = "</script><script>alert(1)</script>&amp;"
    html = page({"run": hostile, "classes": [hostile], "nested_accuracy": None, "model_kind": "head",
                 "similar": {"available": False, "reason": hostile}})
    assert hostile not in html and html.count("</script>") == 2       # the page's own two script elements
    info = json.loads(re.search(r'<script id="info" type="application/json">(.*?)</script>', html, re.S).group(1))
    assert info["run"] == hostile and info["classes"] == [hostile]
    assert accuracy_info({"mean": 0.9, "std": 0.01, "ci_low": 0.85, "ci_high": 0.95}) == \
        {"mean": 0.9, "low": 0.85, "high": 0.95}
    assert accuracy_info(0.8) == {"mean": 0.8, "low": None, "high": None}
    assert accuracy_info(None) is None and accuracy_info({"std": 1}) is None


class _OnlyTheAgreedApi:
    """A Predictor seen through the API serve may rely on (the lead keeps another engineer's Predictor)."""
    __slots__ = ("predict", "classes", "nested_accuracy")

    def __init__(self, real):
        self.predict, self.classes, self.nested_accuracy = real.predict, real.classes, real.nested_accuracy


def test_serve_needs_nothing_of_the_predictor_beyond_its_agreed_api(trained, monkeypatch):
    from featurepipe.deploy import predictor as predictor_module

    real = predictor_module.Predictor
    monkeypatch.setattr(predictor_module, "Predictor", lambda *a, **k: _OnlyTheAgreedApi(real(*a, **k)))
    app, notes = build_app(trained[2], model=None)
    assert notes == []
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/health").json()
        assert (health["run"], health["model_kind"], health["similar"]["available"]) == ("run", "head", True)
        answer = client.post("/predict", files=_upload(("r.png", _png(trained[0] / "red" / "red7.png"))))
        assert answer.status_code == 200 and answer.json()["predictions"][0]["similar"][0]["path"] == "red/red7.png"
