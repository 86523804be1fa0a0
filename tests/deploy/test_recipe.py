"""deploy.recipe (OUT/preprocess.py): predict's decoding in plain Pillow, byte for byte."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from featurepipe.backbones.spec import LETTERBOX_FILL
from featurepipe.data.images import decode_image
from featurepipe.deploy import recipe


def photo(width, height, seed):
    """Smooth gradients plus noise: resampling differences show, JPEG keeps them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    made = []

    def save(name, image, **kwargs):
        image.save(folder / name, **kwargs)
        made.append(folder / name)

    save("wide.png", Image.fromarray(photo(97, 41, 1)))
    save("tall.png", Image.fromarray(photo(30, 70, 2)))
    save("exact.png", Image.fromarray(photo(32, 32, 3)))
    save("grey.png", Image.fromarray(photo(50, 45, 4)[..., 0], "L"))
    rgba = np.dstack([photo(60, 40, 5), np.tile(np.linspace(0, 255, 60), (40, 1)).astype(np.uint8)])
    save("alpha.png", Image.fromarray(rgba, "RGBA"))
    save("palette.png", Image.fromarray(photo(44, 52, 6)).convert("P"), transparency=3)
    # big enough for predict's JPEG draft decoding (1/2 .. 1/8 DCT scale) to kick in
    save("big.jpg", Image.fromarray(photo(900, 620, 7)), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6                    # orientation: rotate 90 degrees
    save("rotated.jpg", Image.fromarray(photo(480, 300, 8)), quality=90, exif=exif)
    return made


@pytest.mark.parametrize("policy", ["squash", "center_crop", "letterbox"])
@pytest.mark.parametrize("size", [32, 224])
def test_sized_image_is_what_predict_decodes(images, policy, size):
    for path in images:
        np.testing.assert_array_equal(recipe.sized_image(path, size, policy), decode_image(path, size, policy),
                                      err_msg=f"{path.name} {policy} {size}")


def test_full_image_is_the_whole_oriented_rgb_file(images):
    by_name = {p.name: p for p in images}
    assert recipe.full_image(by_name["big.jpg"]).shape == (620, 900, 3)
    assert recipe.full_image(by_name["rotated.jpg"]).shape == (480, 300, 3)      # EXIF applied
    alpha = recipe.full_image(by_name["alpha.png"])
    assert alpha.dtype == np.uint8 and alpha.shape == (40, 60, 3)
    assert (alpha[:, 0] >= 250).all()        # the transparent left edge is white, as predict composites it
    assert recipe.LETTERBOX_FILL == LETTERBOX_FILL
    with pytest.raises(ValueError, match="unknown resize policy"):
        recipe.sized_image(by_name["wide.png"], 32, "stretch")


def test_the_shipped_file_runs_without_featurepipe(images, tmp_path):
    script = tmp_path / "preprocess.py"
    script.write_text(open(recipe.__file__).read())
    done = subprocess.run([sys.executable, "-c", "import sys, preprocess; preprocess.sized_image(sys.argv[1], 8, "
                           "'letterbox'); assert not any(m.startswith('featurepipe') for m in sys.modules)",
                           str(images[0])], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
