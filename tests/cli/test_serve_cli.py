"""`featurepipe serve` as a user runs it: a child process that loads the run, listens on 127.0.0.1,
answers, prints no TensorFlow start-up noise and stops on Ctrl-C; and its refusals, in-process."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from featurepipe.cli.app import app  # noqa: E402
from featurepipe.cli.quiet import is_startup_noise  # noqa: E402
from tests.serve_support import free_port, make_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLI = "import tests.tiny_backbone; from featurepipe.cli.app import main; main()"
START_SECONDS = 240       # a child importing TensorFlow on a busy 2-core machine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve-cli"))


@pytest.mark.slow
def test_serve_answers_on_loopback_quietly_and_stops_on_ctrl_c(trained):
    data, _, run = trained
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    # SIGINT as a terminal gives it, also when pytest itself was started in the background (which
    # leaves SIGINT ignored for its children, and the Ctrl-C below would then do nothing).
    child = subprocess.Popen([sys.executable, "-c", CLI, "serve", str(run), "--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert child.poll() is None, f"serve exited with {child.returncode}: {child.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"serve did not answer within {START_SECONDS} s"
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json()["classes"] == ["blue", "green", "red"]
        answer = httpx.post(f"{base}/predict", timeout=60,
                            files=[("files", ("b.png", (data / "blue" / "blue4.png").read_bytes(), "image/png"))])
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "blue"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
    assert child.returncode == 130, (child.returncode, err[-2000:])
    assert f"serving {run} at http://127.0.0.1:{port}/" in " ".join(out.split())
    assert [line for line in err.splitlines() if is_startup_noise(line)] == []
    assert "Traceback" not in err and "interrupted: the server stopped" in " ".join(err.split())


def test_a_port_in_use_is_refused_before_the_model_loads(trained, monkeypatch):
    from featurepipe.deploy import serve as serve_module

    def no_build(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")
    monkeypatch.setattr(serve_module, "build_app", no_build)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(trained[2]), "--port", str(port)])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(result.stderr.split())


def test_a_non_loopback_host_is_warned_about(trained):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): no machine has it, so nothing is ever exposed; the warning comes
    # first, then the address is refused before the model loads.
    result = CliRunner().invoke(app, ["serve", str(trained[2]), "--host", "192.0.2.1", "--port", str(free_port())])
    err = " ".join(result.stderr.split())
    assert "warning: serving on 192.0.2.1, which other machines can reach" in err and "--host 127.0.0.1" in err
    assert result.exit_code == 1 and "cannot listen on 192.0.2.1" in err


@pytest.mark.parametrize("args, message", [
    (["--max-upload-mb", "0"], "--max-upload-mb"),
    (["--port", "70000"], "--port"),
])
def test_bad_options_are_usage_errors(trained, args, message):
    result = CliRunner().invoke(app, ["serve", str(trained[2]), *args])
    assert result.exit_code == 2 and message in result.stderr


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "cache"),
                                      "--port", str(free_port())])
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty'} is not a run directory" in " ".join(result.stderr.split())
