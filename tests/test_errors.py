"""featurepipe.core.errors: every exception survives pickling (Dask workers send them to the driver),
and a UsageError is both a FeaturepipeError (the CLI's clean message) and a ValueError."""

import inspect
import pickle

import pytest

from featurepipe.core import errors

CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)
           and c.__module__ == errors.__name__]


def _instance(cls):
    if cls is errors.ImageDecodeError:
        return cls("data/red/x.png", "truncated JPEG")
    return cls("what went wrong, and what to do")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_message_and_fields(cls):
    error = _instance(cls)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert str(again) == str(error)
    assert vars(again) == vars(error)


def test_image_decode_error_keeps_path_and_reason():
    again = pickle.loads(pickle.dumps(errors.ImageDecodeError("a b/ü.png", "not an image")))
    assert (again.path, again.reason, str(again)) == ("a b/ü.png", "not an image", "a b/ü.png: not an image")


def test_usage_error_is_a_featurepipe_error_and_a_value_error():
    assert issubclass(errors.UsageError, errors.FeaturepipeError)
    assert issubclass(errors.UsageError, ValueError)
    assert len(CLASSES) >= 10
