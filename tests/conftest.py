import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The key that signs run artefacts (featurepipe.core.trust): one per test session, never the user's own.
import tempfile  # noqa: E402

os.environ.setdefault("FEATUREPIPE_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="featurepipe-key-"), "trust.key"))

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.tiny_backbone  # noqa: F401  (registers the "tiny" backbone)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image(path: Path, colour, seed: int, size=(48, 40)) -> Path:
    """A noisy image dominated by one colour: classes are separable, every file's bytes differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path):
    """DATA/<class>/*.png with 3 classes x 8 images."""
    root = tmp_path / "data"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(root / name / f"{name}{i}.png", colour, seed=100 * c + i)
    return root


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"
