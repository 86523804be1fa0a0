"""The report in a real browser: headless Chromium loads report.html, and every section is there and
every embedded image (charts, thumbnails, the embedding map's hover thumbnails) decodes.

Needs Debian's `chromium` (`apt-get install -y chromium`, or `make browser-test`); skipped with that
hint when no Chromium is installed. CI's `make test` does not install it (hundreds of MB of apt
packages on every run); run `make browser-test` after changing the report.
"""

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from featurepipe import pipeline
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.evaluation.config import SearchConfig

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed: `apt-get install -y "
                                                        "chromium` (or `make browser-test`) runs this test")

# Injected before </body>: probes every SVG <image> with a hidden <img> (so the load event waits for
# them too), then on load writes what it found into <pre id="fp-check"> for --dump-dom to return.
CHECKER = """<script>
document.addEventListener('DOMContentLoaded', () => {
  for (const im of document.querySelectorAll('svg image')) {
    const probe = document.createElement('img'); probe.className = 'fp-probe'; probe.style.display = 'none';
    probe.src = im.getAttribute('href'); document.body.appendChild(probe);
  }
});
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ids = new Set([...document.querySelectorAll('svg image')].map(i => i.id));
  const out = {
    imgs: imgs.filter(i => i.className !== 'fp-probe').map(i => [i.alt, i.complete && i.naturalWidth > 0]),
    svgimages: imgs.filter(i => i.className === 'fp-probe').map(i => i.complete && i.naturalWidth > 0),
    uses: [...document.querySelectorAll('svg use')].map(u => ids.has(u.getAttribute('href').slice(1))),
    points: document.querySelectorAll('svg.emap g.pt').length,
    titles: [...document.querySelectorAll('svg.emap g.pt title')].map(t => t.textContent),
    sections: [...document.querySelectorAll('section h2')].map(h => h.textContent),
    external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !u.startsWith('data:') && !u.startsWith('#'))};
  const pre = document.createElement('pre'); pre.id = 'fp-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def render(html_path, tmp_path) -> dict:
    page = html_path.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECKER + "</body>", 1), encoding="utf-8")
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="fp-check">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the checker did not run in Chromium: {done.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(match.group(1)))


def test_report_sections_and_images_load_in_headless_chromium(image_tree, cache, tmp_path):
    with Image.open(image_tree / "green" / "green0.png") as im:
        im.save(image_tree / "blue" / "green0_as_blue.jpg", quality=95)     # a cross-class copy
    (image_tree / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    result = pipeline.run(image_tree, SearchConfig(specs=(TINY,), heads=("logreg",), folds=3),
                          cache, run_dir=tmp_path / "run", n_jobs=1)
    found = render(result.report_path, tmp_path)

    for title in ("Run", "Leaderboard", "Near-duplicates and leakage", "Label issues", "Outliers", "Class balance",
                  "Learning curve", "Embedding map", "Reproduce"):
        assert title in found["sections"], title
    broken = [alt for alt, ok in found["imgs"] if not ok]
    assert not broken, f"images that did not load: {broken}"
    assert len(found["imgs"]) >= 10                  # charts + duplicate pair + suspects + outliers thumbnails
    assert found["svgimages"] and all(found["svgimages"])          # hover thumbnails of the embedding map
    assert found["uses"] and all(found["uses"])                    # every point's <use> finds its thumbnail
    assert found["points"] == 2 * 25                               # PCA and t-SNE, 25 decodable training images
    assert any("green0_as_blue.jpg" in t for t in found["titles"])
    assert not any("broken.png" in t for t in found["titles"])
    assert found["external"] == []                                 # self-contained: nothing fetched


def test_inspect_html_loads_in_headless_chromium(image_tree, cache, tmp_path):
    from featurepipe.data.dataset import scan
    from featurepipe.inspection.inspect import inspect_dataset
    from featurepipe.report.inspect_sections import SECTIONS, write_inspect_report

    out = inspect_dataset(scan(image_tree, cache_dir=cache), TINY, cache, out_dir=tmp_path / "insp", folds=3,
                          n_jobs=1).out_dir
    found = render(write_inspect_report(out), tmp_path)
    assert found["sections"] == list(SECTIONS)
    assert all(ok for _, ok in found["imgs"]) and all(found["svgimages"]) and found["external"] == []
