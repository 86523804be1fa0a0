"""Make tests/golden/: run directories written by featurepipe 0.1.0 (commit 60c9797, before the renovation).

Runs against that version's flat modules, not today's: `git worktree add /tmp/old 60c9797`, then run this
script from /tmp/old. Kept as the record of how the golden files were made."""
import json, os, shutil, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
os.environ["FEATUREPIPE_KEY_FILE"] = str(out / "trust.key")
from tests.conftest import COLOURS, make_image
import tests.tiny_backbone  # noqa
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.dataset import scan
from featurepipe.evaluate import evaluate
from featurepipe.predict import predict
data, cache = Path("/tmp/golden-data"), Path("/tmp/golden-cache")
shutil.rmtree(data, ignore_errors=True); shutil.rmtree(cache, ignore_errors=True)
for c, (name, colour) in enumerate(COLOURS.items()):
    for i in range(6):
        make_image(data / name / f"{name}{i}.png", colour, seed=100 * c + i, size=(36, 30))
TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY2 = BackboneSpec(name="tiny2", weights="random", image_size=32)
ds = scan(data, cache_dir=cache)
evaluate(ds, TINY, cache, heads=("logreg",), folds=2, run_dir=out / "logreg", n_jobs=1)
evaluate(ds, TINY, cache, heads=("dense",), folds=2, run_dir=out / "dense", n_jobs=1, grids={"dense": {"epochs": [3]}})
evaluate(ds, TINY, cache, heads=("knn", "ncm", "logreg"), folds=2, run_dir=out / "ensemble", n_jobs=1, ensemble=3)
evaluate(ds, TINY, cache, heads=("logreg",), folds=2, run_dir=out / "vote", n_jobs=1, specs=[TINY, TINY2])
expected = {}
for name in ("logreg", "dense", "ensemble", "vote"):
    r = predict(out / name, [data], top_k=1)
    expected[name] = {Path(p).name: list(map(float, row)) for p, row in zip(r.frame["path"], r.frame[[c for c in r.frame.columns if c.startswith("p[")]].to_numpy())}
(out / "expected.json").write_text(json.dumps(expected, indent=0, sort_keys=True))
from featurepipe.finetune import finetune
shutil.copytree(out / "logreg", out / "finetuned")
res = finetune(out / "finetuned", epochs=2, cache_dir=cache, batch_size=4)
summary = json.load(open(out / "finetuned" / "finetune" / "summary.json"))
(out / "finetuned" / "model.json").write_text(json.dumps(summary["model_json"], indent=2))
shutil.rmtree(out / "finetuned" / "logs")
r = predict(out / "finetuned", [data], top_k=1)
expected["finetuned"] = {Path(p).name: list(map(float, row)) for p, row in zip(r.frame["path"], r.frame[[c for c in r.frame.columns if c.startswith("p[")]].to_numpy())}
expected["_model_kind"] = {n: predict(out / n, [data / "red" / "red0.png"]).model_kind for n in ("logreg", "dense", "ensemble", "vote", "finetuned")}
(out / "expected.json").write_text(json.dumps(expected, indent=0, sort_keys=True))
# dense_head.joblib / dense_head_X.npy / dense_head_proba.json: a dense head pickled by 0.1.0 on its own
# (make_head("dense", {"epochs": 3}, 0) fitted on 30 rows of seeded noise, 3 classes; see test_golden).
