"""The Makefile agrees with the package: `make clean` removes every cache entry featurepipe keeps
(featurepipe.core.cachedirs.ENTRIES), the run directories included, as it always did."""

import shlex
from pathlib import Path

from featurepipe.core import cachedirs

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def clean_removes() -> set[str]:
    """The paths the `clean` target's rm -rf names (one plain command under the target)."""
    lines = MAKEFILE.read_text().splitlines()
    start = lines.index("clean:")
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    assert len(recipe) == 1, f"`make clean` should stay one rm -rf line, found {recipe}"
    words = shlex.split(recipe[0])
    assert words[:2] == ["rm", "-rf"], recipe[0]
    return set(words[2:])


def test_make_clean_removes_every_cache_entry():
    removed = clean_removes()
    missing = [entry for entry in cachedirs.ENTRIES if f"cache/{entry}" not in removed]
    assert missing == [], f"add {', '.join(f'cache/{m}' for m in missing)} to the Makefile's clean target"
    assert set(cachedirs.DERIVED) <= set(cachedirs.ENTRIES)


def test_make_clean_names_nothing_that_is_not_a_cache_entry():
    removed = {p for p in clean_removes() if p.startswith("cache/")}
    assert removed == {f"cache/{entry}" for entry in cachedirs.ENTRIES}
