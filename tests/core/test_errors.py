"""featurepipe.core.errors: every exception survives pickling (Dask workers send them to the driver),
a UsageError is both a FeaturepipeError (the CLI's clean message) and a ValueError, and bad arguments
raise UsageError."""

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


# ---- bad arguments are UsageErrors (the CLI prints them; a bare ValueError would be a traceback) ----


def _bad_inputs():
    from featurepipe.backbones.accel import check_precision
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.extraction.batches import plan_batches

    return {
        "precision": (lambda: check_precision("float8"), "precision must be one of"),
        "pooling": (lambda: BackboneSpec(pooling="median").resolved(), "pooling must be one of"),
        "resize": (lambda: BackboneSpec(resize="stretch").resolved(), "resize must be one of"),
        "image size": (lambda: BackboneSpec(image_size=8).resolved(), "needs images of at least"),
        "concat layer": (lambda: BackboneSpec(name="efficientnet_lite0+efficientnet_lite1", pooling="max").resolved(),
                         "--layer and --pooling apply to single backbones only"),
        "batch size": (lambda: plan_batches({"a1": ["a1"]}, 0), "batch size must be at least 1"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_a_bad_argument_raises_a_usage_error_with_its_message(case):
    call, message = _bad_inputs()[case]
    with pytest.raises(errors.UsageError, match=message) as caught:
        call()
    assert isinstance(caught.value, errors.FeaturepipeError) and isinstance(caught.value, ValueError)


# ---- what a Dask worker raises comes back to the driver whole ----


def test_the_errors_a_worker_raises_before_building_anything_pickle(tmp_path):
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.extraction.batches import Batch, BatchJob, run_batch

    spec = BackboneSpec(weights=str(tmp_path / "absent.weights.h5"))
    job = BatchJob(spec=spec, root=str(tmp_path), payload={}, originals_incoming=str(tmp_path / "incoming"),
                   views_incoming=None, policy=None, augment_seed=0, chunk=0)
    batch = Batch("0" * 24, (("a1", ("a1",)),))
    caught = []
    for prepare in (lambda: None, lambda: (tmp_path / "incoming").mkdir()):
        prepare()
        with pytest.raises(errors.FeaturepipeError) as error:
            run_batch(job, batch, {"a1": str(tmp_path / "a1.png")})
        caught.append(error.value)
    assert [type(e) for e in caught] == [errors.StoreError, errors.BackboneError]
    for error in caught:
        again = pickle.loads(pickle.dumps(error))
        assert (type(again), str(again)) == (type(error), str(error))
