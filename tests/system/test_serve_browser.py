"""serve's page in a real browser: headless Chromium opens it, a photo goes in through the page's own
file input (Chrome DevTools Protocol DOM.setFileInputFiles, as a person picking a file), and the top
class, its probability and the similar photos' thumbnails that the page shows are read back.

The DevTools Protocol is spoken over --remote-debugging-pipe (NUL-terminated JSON on the child's
file descriptors 3 and 4), so no websocket client is needed. Skipped, with the hint, where no
Chromium is installed (`apt-get install -y chromium` or `make browser-test`).
"""

import json
import os
import select
import shutil
import subprocess
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from featurepipe.deploy.predict import predict  # noqa: E402
from featurepipe.deploy.serve import build_app  # noqa: E402
from tests.conftest import COLOURS, make_image  # noqa: E402
from tests.serve_support import make_run, serving  # noqa: E402

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed: `apt-get install -y "
                                                        "chromium` (or `make browser-test`) runs this test")
WAIT_SECONDS = 90


class DevTools:
    """A Chromium child and its DevTools Protocol over the debugging pipe; every wait has a deadline."""

    def __init__(self, profile):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        # The child must find the pipe at fds 3 (commands in) and 4 (answers out); bash puts them there.
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome} {to_chrome}<&- {from_chrome}>&-', BROWSER,
             "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--no-first-run", "about:blank"],
            pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._id = 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            answer = self._next(deadline)
            if answer.get("id") == self._id:
                assert "error" not in answer, (method, answer["error"])
                return answer["result"]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "Chromium did not answer in time"
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 16)
                assert chunk, "Chromium closed the debugging pipe"
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, session: str, expression: str):
        return self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, session: str, expression: str):
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            value = self.evaluate(session, expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"the page never satisfied {expression}"
            time.sleep(0.1)

    def close(self) -> None:
        os.close(self._write)
        os.close(self._read)
        self.process.kill()
        self.process.wait(timeout=30)


RESULT = """(() => {
  const card = document.querySelector('.card');
  if (!card || !card.dataset.state) return null;
  const thumbs = [...card.querySelectorAll('.similar img')];
  if (!thumbs.every(i => i.complete)) return null;
  return {state: card.dataset.state, name: card.querySelector('h2').textContent,
          top: (card.querySelector('.bar.top .name') || {}).textContent,
          p: (card.querySelector('.bar.top .p') || {}).textContent,
          thumbs: thumbs.map(i => i.naturalWidth > 0), error: (card.querySelector('.error') || {}).textContent || null};
})()"""


@pytest.mark.slow
def test_a_photo_picked_on_the_page_shows_its_top_class_and_similar_photos(tmp_path):
    data, _, run = make_run(tmp_path / "made")
    photo = make_image(tmp_path / "upload" / "my_green_photo.png", COLOURS["green"], seed=999, size=(90, 60))
    expected = predict(run, [photo]).records()[0]
    app, _ = build_app(run)
    with serving(app) as url:
        browser = DevTools(tmp_path / "profile")
        try:
            target = browser.send("Target.createTarget", url=f"{url}/")["targetId"]
            session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            browser.send("Runtime.enable", session)
            browser.wait_for(session, "document.readyState === 'complete' && !!document.getElementById('files')")
            facts = browser.evaluate(session, "document.getElementById('facts').textContent")
            assert "3 classes (blue, green, red)" in facts and "nested-CV accuracy" in facts

            root = browser.send("DOM.getDocument", session)["root"]["nodeId"]
            node = browser.send("DOM.querySelector", session, nodeId=root, selector="input#files[type=file]")["nodeId"]
            assert node, "the page has no file input"
            browser.send("DOM.setFileInputFiles", session, nodeId=node, files=[str(photo)])
            shown = browser.wait_for(session, RESULT)

            bad = tmp_path / "upload" / "notes.png"
            bad.write_text("<html>not a photo</html>")
            browser.send("DOM.setFileInputFiles", session, nodeId=node, files=[str(bad)])
            error = browser.wait_for(session, RESULT.replace("document.querySelector('.card')",
                                                             "document.querySelectorAll('.card')[0]"))
        finally:
            browser.close()
    assert shown["state"] == "done" and shown["error"] is None and shown["name"] == "my_green_photo.png"
    assert shown["top"] == expected["label"] == "green"
    assert shown["p"] == f"{100 * expected['probability']:.1f}%"
    assert len(shown["thumbs"]) == 5 and all(shown["thumbs"])
    assert error["state"] == "error" and error["name"] == "notes.png" and "not a recognised image format" in error["error"]
