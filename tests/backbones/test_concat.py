"""Concatenated backbones ("a+b"): one feature set made of each part's average-pooled features side
by side, searchable like any backbone, served by predict and export, refused by fine-tuning."""

import json

import keras
import numpy as np
import pytest

import tests.tiny_backbone  # noqa: F401  (registers "tiny" and "tiny2")
from featurepipe.backbones.build import build_feature_model
from featurepipe.backbones.registry import get_backbone
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.core.errors import BackboneError, FeaturepipeError
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.extraction.extract import open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.data.images import decode_image
from featurepipe.evaluation.search import parse_backbones, search_specs
from featurepipe.training.config import FinetuneConfig
from featurepipe.evaluation.config import SearchConfig

BOTH = BackboneSpec(name="tiny+tiny2", weights="random")


def test_a_concatenation_is_a_backbone_made_of_its_parts():
    info = get_backbone("tiny+tiny2")
    assert (info.feature_dim, info.default_size, info.min_size, info.preprocess) == (24 + 12, 40, 16, "tf")
    assert BOTH.resolved().image_size == 40                     # the larger default size
    model = build_feature_model(BOTH)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    features = np.asarray(model(images))
    assert features.shape == (3, 36)
    # The parts inside, run on the same preprocessed images and average-pooled, side by side.
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    preprocessed = model.get_layer("preprocess")(images)
    parts = [np.asarray(keras.layers.GlobalAveragePooling2D()(base.get_layer(n)(preprocessed))) for n in ("tiny", "tiny2")]
    np.testing.assert_allclose(features, np.hstack(parts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, message", [
    ("tiny+tiny", "names a backbone twice"),
    ("tiny+", "two or more backbones"),
    ("tiny+nope", "unknown backbone 'nope'"),
    ("tiny+vgg16", "preprocess images differently (caffe, tf)"),
])
def test_bad_concatenations_are_clear_errors(name, message):
    with pytest.raises(BackboneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_backbone(name)
    with pytest.raises(FeaturepipeError, match=f"--backbone {name.replace('+', '[+]')}"):
        parse_backbones(f"tiny,{name}")


def test_layer_and_pooling_options_are_refused_for_a_concatenation():
    for options in ({"layer": "block1_conv"}, {"pooling": "max"}):
        with pytest.raises(ValueError, match="single backbones only"):
            BackboneSpec(name="tiny+tiny2", **options).resolved()


def test_searched_saved_predicted_exported_and_not_fine_tuned(image_tree, cache, tmp_path):
    """`--backbone tiny+tiny2,tiny`: the concatenation is one more feature set; a run on it alone saves
    a head that predict and the exported Keras model (safe_mode) apply to the concatenated features."""
    from featurepipe.deploy.export import export
    from featurepipe.training.finetune import finetune
    from featurepipe.deploy.predict import predict

    names = parse_backbones("tiny+tiny2,tiny")
    specs = search_specs(names, resize="squash", weights="random")
    dataset = scan(image_tree, cache_dir=cache)
    searched = evaluate(dataset, SearchConfig(heads=("logreg",), specs=specs, folds=3),
                        cache, n_jobs=1, run_dir=tmp_path / "search")
    assert {"tiny+tiny2/squash", "tiny/squash"} <= set(searched.leaderboard["features"])
    assert searched.extract.extracted == 2 * 24

    run = tmp_path / "concat"
    evaluate(dataset, SearchConfig(specs=(specs[0],), heads=("logreg",), folds=3), cache, n_jobs=1, run_dir=run)
    meta = json.loads((run / "best_head.json").read_text())
    assert meta["backbone"]["name"] == "tiny+tiny2"
    features = dataset_features(dataset, open_stores(specs[0], cache))
    assert features.X.shape == (24, 36)
    from featurepipe.rundir.heads_io import load_head

    head, _ = load_head(run)
    paths = features.frame["path"].tolist()[:4]
    predicted = predict(run, paths, cache_dir=cache)
    columns = [f"p[{c}]" for c in predicted.classes]
    np.testing.assert_allclose(predicted.frame[columns].to_numpy(), head.predict_proba(features.X[:4]), atol=1e-6)
    exported = export(run, "keras", tmp_path / "exported", cache_dir=cache)
    import featurepipe.heads.to_keras  # noqa: F401  (the featurepipe layers the .keras file names)

    model = keras.saving.load_model(next(exported.path.glob("*.keras")) if exported.path.is_dir() else exported.path,
                                    safe_mode=True)
    images = np.stack([decode_image(p, 40, "squash") for p in paths])
    np.testing.assert_allclose(np.asarray(model.predict_on_batch(images)), predicted.frame[columns].to_numpy(),
                               atol=1e-4)
    with pytest.raises(FeaturepipeError, match="concatenation of backbones"):
        finetune(run, FinetuneConfig(epochs=1), cache_dir=cache)
