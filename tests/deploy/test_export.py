"""export: each artefact, reloaded in a fresh process, gives predict's probabilities."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.core.errors import FeaturepipeError
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.deploy.export import FORMATS, export
from featurepipe.data.images import decode_image
from featurepipe.deploy.predict import predict
from featurepipe.training.config import FinetuneConfig
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, REPO, make_image
from tests.deploy.plain_support import run_plain

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)

# Loads every artefact the way a deployment would, in a process that never saw the exporting
# one and never imports featurepipe: the keras file too holds Keras' built-in layers only.
LOADER = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import warnings
    warnings.filterwarnings("ignore")
    import numpy as np
    import tensorflow as tf
    import keras

    exports, inputs, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    results = {}
    saved = tf.saved_model.load(exports["savedmodel"])
    model = keras.saving.load_model(exports["keras"])      # safe_mode on, nothing registered
    try:   # LiteRT where installed (what export.json tells users to run), else TF's deprecated copy
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    runner = Interpreter(model_path=exports["tflite"]).get_signature_runner("serving_default")
    for name in sorted(np.load(inputs).files):
        batch = np.load(inputs)[name]
        results[f"savedmodel/{name}"] = saved.serve(tf.constant(batch)).numpy()
        results[f"keras/{name}"] = np.asarray(model.predict_on_batch(batch))
        # A bare call passes no training flag: it must be inference too (deterministic).
        called = [np.asarray(model(batch)) for _ in range(2)]
        assert np.array_equal(called[0], called[1]), "model(x) is not deterministic"
        if name == "sized":
            results[f"tflite/{name}"] = np.concatenate([runner(images=image[None])["output_0"] for image in batch])
    assert not any(m.startswith("featurepipe") for m in sys.modules), "an artefact needed featurepipe"
    np.savez(out, **results)
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    data, cache = base / "data", base / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(data / name / f"{name}{i}.png", colour, seed=100 * c + i)
    # The dense head: its Dropout must stay off in every artefact however it is called.
    evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("dense",), folds=2),
             cache, run_dir=base / "run", n_jobs=1)
    results = {fmt: export(base / "run", fmt, base / fmt) for fmt in FORMATS}
    return base, results


def test_labels_and_metadata_describe_the_model(exported):
    base, results = exported
    for fmt, result in results.items():
        assert result.path.exists() and result.model_kind == "head"
        assert result.labels_path.read_text().splitlines() == ["blue", "green", "red"]
        meta = json.loads(result.meta_path.read_text())
        assert meta["format"] == fmt and meta["classes"] == ["blue", "green", "red"]
        assert meta["image_size"] == 32 and meta["resize"] == "squash"
        assert meta["input"]["dtype"] == "uint8" and meta["output"]["shape"][-1] == 3
    assert results["tflite"].input_shape == [1, 32, 32, 3]
    assert results["keras"].input_shape == [None, None, None, 3]
    tflite = json.loads(results["tflite"].meta_path.read_text())
    assert "NOT inside" in tflite["input"]["resizing"]
    assert "ai_edge_litert.interpreter" in tflite["run"] and "labels.txt" in tflite["run"]
    assert "sized_image(path, 32, 'squash')" in tflite["run"]
    for fmt, result in results.items():
        meta = result.meta
        # the artefact against predict on the run's 24 training images, within the promised tolerance
        measured = meta["agreement"]
        assert measured["images"] == 24 and measured["within_tolerance"] is True, (fmt, measured)
        assert measured["max_abs_diff"] <= measured["tolerance"] == (1e-4 if fmt == "tflite" else 2e-2)
        assert (result.path.parent / "preprocess.py").read_text() == (REPO / "featurepipe/deploy/recipe.py").read_text()
    try:
        import ai_edge_litert  # noqa: F401
        assert tflite["checked_with"].startswith("ai-edge-litert ")
    except ImportError:
        assert tflite["checked_with"].startswith("tf.lite.Interpreter")


def test_every_artefact_reloads_in_a_fresh_process_and_matches_predict(exported, tmp_path):
    base, results = exported
    # Images already at the model's size: resizing is the identity, so all paths must agree.
    sized = [make_image(tmp_path / "sized" / f"{name}.png", colour, seed=900 + i, size=(32, 32))
             for i, (name, colour) in enumerate(COLOURS.items())]
    sized.append(make_image(tmp_path / "sized" / "grey.png", (128, 128, 128), seed=999, size=(32, 32)))
    raw = [make_image(tmp_path / "raw" / f"{name}.png", colour, seed=950 + i, size=(53 + 9 * i, 37 + 5 * i))
           for i, (name, colour) in enumerate(COLOURS.items())]
    expected = predict(base / "run", sized).frame[[f"p[{c}]" for c in ("blue", "green", "red")]].to_numpy()
    expected_raw = predict(base / "run", raw).frame[[f"p[{c}]" for c in ("blue", "green", "red")]].to_numpy()
    inputs = tmp_path / "inputs.npz"
    sized_pixels = np.stack([decode_image(p, 32, "squash") for p in sized])
    from PIL import Image

    np.savez(inputs, sized=sized_pixels, **{f"raw{i}": np.asarray(Image.open(p).convert("RGB"))[None]
                                              for i, p in enumerate(raw)})
    out = tmp_path / "outputs.npz"
    paths = {fmt: str(result.path) for fmt, result in results.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(paths), str(inputs), str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = dict(np.load(out))

    for fmt in FORMATS:
        np.testing.assert_allclose(got[f"{fmt}/sized"], expected, rtol=0, atol=1e-4, err_msg=fmt)
    for fmt in ("keras", "savedmodel"):
        for i in range(len(raw)):
            probabilities = got[f"{fmt}/raw{i}"][0]
            np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5)
            assert (probabilities >= 0).all()
            # TF's antialiased bilinear is close to, not identical with, PIL's resampling.
            assert np.argmax(probabilities) == np.argmax(expected_raw[i])
            np.testing.assert_allclose(probabilities, expected_raw[i], atol=5e-3, err_msg=f"{fmt} raw{i}")


def test_a_finetuned_run_exports_its_finetuned_model(exported, tmp_path):
    import shutil

    from featurepipe.training.finetune import finetune

    base, _ = exported
    run_dir = tmp_path / "run"
    shutil.copytree(base / "run", run_dir)
    # strategy "head": the frozen head and base as one Keras model, always the run's model afterwards
    # (a trained one is kept only when it beats the frozen head; see tests/training/test_finetune.py).
    assert finetune(run_dir, FinetuneConfig(strategy="head"), cache_dir=base / "cache").kept == "finetuned"
    result = export(run_dir, "keras", tmp_path / "out")
    assert result.model_kind == "finetuned"
    assert json.loads(result.meta_path.read_text())["finetuned"]["file"] == "finetune/finetuned.keras"
    sized = [make_image(tmp_path / "sized" / f"{name}.png", colour, seed=700 + i, size=(32, 32))
             for i, (name, colour) in enumerate(COLOURS.items())]
    predicted = predict(run_dir, sized)
    assert predicted.model_kind == "finetuned"
    # plain Keras loads it (the fine-tuned file itself names featurepipe's layers; the export does not)
    got = run_plain({"finetuned": str(result.path)},
                    {"finetuned": np.stack([decode_image(p, 32, "squash") for p in sized])}, tmp_path)["finetuned"]
    np.testing.assert_allclose(got, predicted.frame[["p[blue]", "p[green]", "p[red]"]].to_numpy(), atol=1e-4)
    assert result.meta["agreement"]["within_tolerance"] is True


def test_bad_requests_fail_clearly(exported, tmp_path):
    base, _ = exported
    with pytest.raises(FeaturepipeError, match="unknown export format"):
        export(base / "run", "onnx", tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(FeaturepipeError, match="is a file"):
        export(base / "run", "keras", tmp_path / "file")
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text("{}")
    with pytest.raises(FeaturepipeError, match="no trained head"):
        export(headless, "keras", tmp_path / "y")
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(base / "run", tampered)
    head_file = json.loads((tampered / "best_head.json").read_text())["file"]
    with open(tampered / head_file, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(FeaturepipeError, match="does not match the hash"):
        export(tampered, "keras", tmp_path / "z")


@pytest.fixture(scope="module")
def vote_run(exported):
    """A run that votes over feature sets with different sizes and resize policies."""
    base, _ = exported
    data, cache = base / "data", base / "cache"
    specs = [TINY, BackboneSpec(name="tiny", weights="random", image_size=40, resize="letterbox"),
             BackboneSpec(name="tiny", weights="random", image_size=32, resize="center_crop")]
    evaluate(scan(data, cache_dir=cache), SearchConfig(heads=("logreg",), specs=specs, folds=2),
             cache, run_dir=base / "vote", n_jobs=1)
    return base / "vote", cache


def raw_images(folder, seed):
    return [make_image(folder / f"{name}.png", colour, seed=seed + i, size=(61 + 7 * i, 33 + 4 * i))
            for i, (name, colour) in enumerate(COLOURS.items())]


def member_models(run_dir, cache):
    from featurepipe.deploy.export import any_size_model, fixed_size_model
    from featurepipe.rundir.run import open_run

    return [any_size_model(m, fixed_size_model(m, cache)) for m in open_run(run_dir, trust=True).members]


def test_a_vote_exports_as_one_keras_model_that_matches_predict(vote_run, tmp_path):
    """A vote exports as one graph: each member resizes the raw image its own way; the output is the
    members' average; plain Keras loads it."""
    from PIL import Image

    run, cache = vote_run
    result = export(run, "keras", tmp_path / "out")
    meta = json.loads(result.meta_path.read_text())
    assert meta["head"]["head"] == "vote" and [m["resize"] for m in meta["members"]] == [
        "squash", "letterbox", "center_crop"]
    assert [m["image_size"] for m in meta["members"]] == [32, 40, 32]
    assert [m["weight"] for m in meta["members"]] == pytest.approx([1 / 3] * 3)
    raw = raw_images(tmp_path / "raw", 600)
    expected = predict(run, raw, cache_dir=cache).frame[["p[blue]", "p[green]", "p[red]"]].to_numpy()
    pixels = {f"raw{i}": np.asarray(Image.open(path).convert("RGB"))[None] for i, path in enumerate(raw)}
    got = run_plain({name: str(result.path) for name in pixels}, pixels, tmp_path)
    members = member_models(run, cache)
    for i in range(len(raw)):
        probabilities = got[f"raw{i}"][0]
        np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5)
        # Exactly the average of the members exported one by one ...
        np.testing.assert_allclose(probabilities, np.mean([m.predict_on_batch(pixels[f"raw{i}"])[0] for m in members],
                                                          axis=0), atol=1e-5)
        # ... and close to predict: TF's letterbox (pad, then resize) blends the content's edge rows
        # with the grey fill where PIL pastes them (~0.5 grey levels on average, up to 10 on one row),
        # which a random 40 px backbone amplifies; squash and center_crop members agree to 2e-4.
        assert np.argmax(probabilities) == np.argmax(expected[i])
        np.testing.assert_allclose(probabilities, expected[i], atol=3e-2)
    assert meta["agreement"]["within_tolerance"] is True


TFLITE_VOTE = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    folder, paths, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, folder)
    from preprocess import sized_image          # shipped beside the model
    meta = json.load(open(os.path.join(folder, "export.json")))
    runner = Interpreter(model_path=os.path.join(folder, "model.tflite")).get_signature_runner("serving_default")
    rows = [runner(**{i["name"]: sized_image(p, i["image_size"], i["resize"])[None] for i in meta["inputs"]})["output_0"][0]
            for p in paths]
    assert not any(m.startswith("featurepipe") for m in sys.modules)
    np.save(out, np.stack(rows))
""")


def test_a_vote_exports_as_one_tflite_file_with_an_input_per_member_size_and_policy(vote_run, tmp_path):
    pytest.importorskip("ai_edge_litert")
    run, cache = vote_run
    result = export(run, "tflite", tmp_path / "lite")
    names = [i["name"] for i in result.meta["inputs"]]
    assert names == ["images_32_squash", "images_40_letterbox", "images_32_center_crop"]
    assert [m["input"] for m in result.meta["members"]] == names
    raw = raw_images(tmp_path / "raw", 640)
    expected = predict(run, raw, cache_dir=cache).frame[["p[blue]", "p[green]", "p[red]"]].to_numpy()
    done = subprocess.run([sys.executable, "-c", TFLITE_VOTE, str(result.path.parent), json.dumps([str(p) for p in raw]),
                           str(tmp_path / "got.npy")], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # fed by preprocess.py, the vote gives predict's numbers, letterbox member included
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), expected, rtol=0, atol=1e-4)
    assert result.meta["agreement"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_a_weighted_vote_weighs_its_members(vote_run, tmp_path):
    """Votes that list member weights (best_head.json params.weights) export the weighted average."""
    import shutil

    from PIL import Image

    from featurepipe.deploy.export import vote_weights
    from featurepipe.rundir.run import open_run

    source, cache = vote_run
    run = tmp_path / "weighted"
    shutil.copytree(source, run)
    meta = json.loads((run / "best_head.json").read_text())
    meta["params"] = {**(meta.get("params") or {}), "weights": [3, 1, 0]}
    (run / "best_head.json").write_text(json.dumps(meta))
    assert vote_weights(open_run(run, trust=True)) == [0.75, 0.25, 0.0]
    result = export(run, "keras", tmp_path / "out", trust=True, check_images=0)
    assert [m["weight"] for m in result.meta["members"]] == [0.75, 0.25, 0.0]
    assert result.meta["agreement"]["max_abs_diff"] is None and "not measured" in result.meta["agreement"]["note"]
    raw = raw_images(tmp_path / "raw", 680)
    pixels = {f"raw{i}": np.asarray(Image.open(path).convert("RGB"))[None] for i, path in enumerate(raw)}
    got = run_plain({name: str(result.path) for name in pixels}, pixels, tmp_path)
    members = member_models(run, cache)
    for name, x in pixels.items():
        each = [m.predict_on_batch(x)[0] for m in members]
        np.testing.assert_allclose(got[name][0], 0.75 * each[0] + 0.25 * each[1], atol=1e-5)
    meta["params"]["weights"] = [1, 2]
    (run / "best_head.json").write_text(json.dumps(meta))
    with pytest.raises(FeaturepipeError, match="one non-negative number per member"):
        export(run, "keras", tmp_path / "bad", trust=True)
