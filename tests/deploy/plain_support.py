"""Loading exported files in a process that never imports featurepipe (shared by the deploy tests)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

# A process that never imports featurepipe: loads every file with safe_mode on and runs it.
PLAIN_LOADER = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import keras

    files, inputs, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    data = np.load(inputs)
    results = {name: np.asarray(keras.saving.load_model(path)(data[name])) for name, path in files.items()}
    assert not any(m.startswith("featurepipe") for m in sys.modules), "loading needed featurepipe"
    np.savez(out, **results)
""")


def run_plain(files: dict, inputs: dict, tmp_path) -> dict:
    np.savez(tmp_path / "inputs.npz", **inputs)
    done = subprocess.run([sys.executable, "-c", PLAIN_LOADER, json.dumps(files), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))
