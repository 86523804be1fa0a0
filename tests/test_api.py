"""featurepipe's public API: `featurepipe.__all__` names what a notebook user may import, every name
resolves, and importing the package costs nothing heavy (TensorFlow and pandas load on first use)."""

import subprocess
import sys

import pytest

import featurepipe


@pytest.mark.parametrize("name", featurepipe.__all__)
def test_every_public_name_resolves(name):
    value = getattr(featurepipe, name)
    assert value is not None
    if name != "__version__":
        assert getattr(value, "__name__", name) == name


def test_version_is_the_installed_distributions():
    from importlib import metadata

    assert featurepipe.__version__ == metadata.version("featurepipe")


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        featurepipe.nope  # noqa: B018


def test_importing_the_package_imports_neither_tensorflow_nor_pandas():
    code = ("import sys, featurepipe; featurepipe.__version__; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'pandas', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_stages_are_the_modules_functions():
    from featurepipe.deploy.predict import predict
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.pipeline import run

    assert featurepipe.predict is predict and featurepipe.run is run and featurepipe.SearchConfig is SearchConfig
