"""TensorFlow's start-up lines are hidden by default and shown under --verbose; other stderr output survives."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from featurepipe.cli.quiet import is_startup_noise
from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[2]
ONEDNN = ("I0000 00:00:1795829233.967499    6916 port.cc:153] oneDNN custom operations are on. You may see "
          "slightly different numerical results due to floating-point round-off errors from different computation "
          "orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **extra}


def test_known_startup_lines_are_noise_and_nothing_else_is():
    assert is_startup_noise(ONEDNN)
    assert is_startup_noise("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert is_startup_noise("E0000 00:00:1.2 123 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to "
                            "register factory for plugin cuDNN when one has already been registered")
    for line in ("error: data/x.jpg: not a recognised image format",
                 "Traceback (most recent call last):",
                 "W0000 00:00:1.2 123 op_level_cost_estimator.cc:699] Error in PredictCost() for the op",
                 "oneDNN is great"):
        assert not is_startup_noise(line)


def test_filter_drops_native_noise_and_passes_everything_else_through():
    # Native code writes to file descriptor 2 directly, so the test does too, in a child process.
    script = textwrap.dedent(f"""
        import os, sys
        from featurepipe.cli.quiet import filtered_stderr
        os.write(2, b"before\\n")
        with filtered_stderr():
            os.write(2, {ONEDNN!r}.encode() + b"\\n")
            os.write(2, b"a real native error\\n")
            print("python stderr line", file=sys.stderr)
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
            os.write(2, b"no newline at the end")
        os.write(2, b"\\nafter\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["before", "a real native error", "python stderr line",
                                        "no newline at the end", "after"]


def _tf_noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if is_startup_noise(line)]


@pytest.mark.slow
def test_cli_hides_tensorflow_startup_lines_unless_verbose(tmp_path):
    bare = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                          env=_env(), timeout=300)
    if not _tf_noise(bare.stderr):
        pytest.skip("this TensorFlow build prints no start-up lines")
    for c, colour in enumerate([(220, 30, 30), (30, 40, 220)]):
        for i in range(3):
            make_image(tmp_path / "data" / f"c{c}" / f"{i}.png", colour, seed=10 * c + i)
    cli = "import tests.tiny_backbone; from featurepipe.cli.app import main; main()"
    args = ["extract", str(tmp_path / "data"), "--backbone", "tiny", "--weights", "random"]
    quiet = subprocess.run([sys.executable, "-c", cli, *args, "--cache-dir", str(tmp_path / "quiet")], capture_output=True, text=True, env=_env(),
                           cwd=REPO, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "6 extracted" in quiet.stdout
    assert _tf_noise(quiet.stderr) == []
    # A fresh cache: with every feature cached, extract never imports TensorFlow at all.
    verbose = subprocess.run([sys.executable, "-c", cli, "--verbose", *args, "--cache-dir", str(tmp_path / "loud")], capture_output=True, text=True,
                             env=_env(), cwd=REPO, timeout=300)
    assert verbose.returncode == 0, verbose.stderr
    assert "6 extracted" in verbose.stdout
    assert any("oneDNN custom operations are on" in line for line in _tf_noise(verbose.stderr)) == \
        any("oneDNN custom operations are on" in line for line in _tf_noise(bare.stderr))
    assert _tf_noise(verbose.stderr)
