"""deploy.plain: featurepipe's custom layers re-expressed with Keras built-ins, loadable by plain Keras."""

import numpy as np
import pytest

from featurepipe.core.errors import FeaturepipeError
from featurepipe.heads import head_names, make_head
from featurepipe.heads.registry import HEADS
from tests.deploy.plain_support import run_plain
from tests.head_support import fast_params


@pytest.mark.slow
def test_every_head_and_preprocessing_loads_without_featurepipe_with_the_same_numbers(tmp_path):
    import keras

    from featurepipe.backbones.layers import PREPROCESS_MODES, Preprocess, preprocess
    from featurepipe.deploy.plain import plain_model
    from featurepipe.heads.to_keras import head_to_keras

    rng = np.random.default_rng(3)
    files, inputs, expected = {}, {}, {}
    cases = [(name, {}, 3) for name in head_names() if HEADS[name].to_keras]
    # the old one-vs-rest path (PlattOneVsRest after logistic regression) and binary Platt scaling
    cases += [("logreg", {"front": "sqrt"}, 3), ("logreg", {"front": "l2"}, 2), ("linear_svm", {}, 2)]
    for index, (name, extra, n_classes) in enumerate(cases):
        X = np.abs(rng.normal(size=(45, 8))).astype(np.float32)
        y = np.arange(45) % n_classes
        X[y == 1, :3] += 1.5
        X[:, 4] = 0.0                     # a dead channel: the signed sqrt's linear branch
        estimator = make_head(name, {**fast_params(name), **extra}).fit(X, y)
        test = np.abs(rng.normal(size=(9, 8))).astype(np.float32) * np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float32)
        key = f"head{index}_{name}"
        path = tmp_path / f"{key}.keras"
        plain_model(head_to_keras(estimator, 8)).save(path)
        files[key], inputs[key], expected[key] = str(path), test, estimator.predict_proba(test)
    pixels = rng.integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
    for mode in PREPROCESS_MODES:
        images = keras.Input((5, 5, 3), dtype="uint8")
        path = tmp_path / f"pre_{mode}.keras"
        plain_model(keras.Model(images, Preprocess(mode)(images))).save(path)
        files[f"pre_{mode}"], inputs[f"pre_{mode}"] = str(path), pixels
        expected[f"pre_{mode}"] = np.asarray(preprocess(pixels.astype(np.float32), mode))
    got = run_plain(files, inputs, tmp_path)
    for key in files:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-5, err_msg=key)


def test_the_rewrite_drops_dropout_and_inference_wrappers_and_shares_a_reused_model():
    import keras

    from featurepipe.backbones.layers import InferenceMode
    from featurepipe.deploy.plain import check_builtin, plain_model

    features = keras.Input((4,))
    noisy = keras.layers.GaussianNoise(0.9)(keras.layers.Dropout(0.9)(features))
    inner = keras.Model(features, keras.layers.Dense(3, activation="softmax")(noisy), name="inner")
    images = keras.Input((4,))
    shared = InferenceMode(inner, name="wrapped")
    outer = keras.Model(images, keras.layers.Average()([shared(images), shared(images * 2.0)]))
    plain = plain_model(outer)
    nested = [layer for layer in plain.layers if isinstance(layer, keras.Model)]
    assert [layer.name for layer in nested] == ["wrapped"]          # one model, called twice
    assert [type(layer).__name__ for layer in nested[0].layers] == ["InputLayer", "Dense"]
    assert not plain.trainable
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    # training=True changes nothing: no Dropout left, and everything is frozen
    np.testing.assert_allclose(plain(x, training=True), outer(x, training=False), atol=1e-6)
    check_builtin(plain)
    with pytest.raises(FeaturepipeError, match="still holds featurepipe"):
        check_builtin(outer)


def test_a_custom_layer_with_weights_is_refused_by_name():
    import keras

    class Scaled(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    from featurepipe.deploy.plain import plain_model

    inputs = keras.Input((3,))
    with pytest.raises(FeaturepipeError, match="'scaled_layer'.*holds weights"):
        plain_model(keras.Model(inputs, Scaled(name="scaled_layer")(inputs)))
