"""What frozen ImageNet features can give, head by head and feature variant by variant (not a test).

    python benchmarks/frozen_ceiling.py --data data/demo --data fmnist30 --data fmnist100 [--parts ...]

The accuracy issue asks the default `run` to beat the seeds' Dense 256 head by 3 points on
Fashion-MNIST. This script measures the alternatives to today's default (the vote of each feature
set's signed-sqrt + L2 logistic regression) that could plausibly close such a gap, all on features of
the offline EfficientNet-Lite0/1/2 bases, with plain 5-fold stratified CV, seed 0, the same folds in
every column (featurepipe.evaluation.crossval.make_folds without groups, as accuracy.py's (a) and (b)). Fixed
parameters, no selection: these are single configurations, to compare with each other, not
nested-CV estimates. Parts (`--parts`, default all):

  heads    per backbone (squash) and on the concatenation of the three: logreg C=100 (today's head at
           a typical C), LDA with Ledoit-Wolf shrinkage, RBF SVM (C=10, gamma="scale"), ridge
           classifier (alpha 0.1); all after the signed square root + L2 front;
  votes    soft vote across the feature sets (3 backbones x squash/center_crop/letterbox, or squash
           only where the images are square) of logreg C=100, RBF SVM C=1/10/100, and both;
  fronts   the same logreg vote after signed sqrt + L2 (today), + centring, + L2/centring/L2 (C=10, 100);
  selection how the vote's C is chosen, each procedure scored by nested CV on the 5 folds (the inner
           CV of outer fold k uses the other 4 folds, as featurepipe.evaluation.nested does): each feature set's
           own C by inner accuracy, then log loss (today); one C shared by all sets, chosen by the
           vote's inner score; no choice, every C of the grid in the vote; C fixed at 10 or 100;
  pooling  Lite0 and Lite1: the last feature map pooled as global average (today), + 4 overlapping
           quadrants, quadrants alone, + 3 horizontal bands, + global max (each part sqrt + L2);
  sizes    Lite0 and Lite1 at 128 / 176 / default / 288 px input, the three concatenated or averaged;
  headconv Lite0: the base's last 1x1 conv (head_conv, 320 -> 1280, ImageNet init) + the logreg head
           trained together on cached blocks_15 maps (AdamW 1e-3, 12 epochs, batch 32): fine-tuning
           of the top layer with no backbone pass; the accuracy after each epoch.

Prints one JSON line per data set and part, then the figures as text. Extraction goes through
featurepipe's store (--cache-dir, default a temporary folder), so a second call reuses it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PARTS = ("heads", "votes", "fronts", "selection", "pooling", "sizes", "headconv")
C_GRID = (10.0, 100.0, 1000.0)          # the logreg head's default grid


class Features:
    """Features of one data set by (backbone, resize, size, pooling, layer), extracted once into the cache."""

    def __init__(self, data: Path, cache: Path):
        from featurepipe.data.dataset import scan

        self.dataset = scan(data, cache_dir=cache)
        self.cache = cache
        self.y = None

    def get(self, name: str, resize: str = "squash", size: int | None = None, pooling: str = "avg",
            layer: str | None = None) -> np.ndarray:
        from featurepipe.backbones.spec import BackboneSpec
        from featurepipe.extraction.extract import extract, open_stores
        from featurepipe.extraction.features import dataset_features

        spec = BackboneSpec(name=name, resize=resize, image_size=size, pooling=pooling, layer=layer).resolved()
        extract(self.dataset, spec, self.cache)
        table = dataset_features(self.dataset, open_stores(spec, self.cache))
        classes = list(self.dataset.classes)
        y = table.frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        if self.y is None:
            self.y = y
        elif not np.array_equal(self.y, y):
            raise SystemExit(f"{spec.name}/{spec.resize}: rows came back in another order")
        return np.asarray(table.X, dtype=np.float64)

    @functools.cached_property
    def square(self) -> bool:
        """Whether squash, center_crop and letterbox give the same pixels (every image square)."""
        return bool(np.array_equal(self.get(BACKBONES[0], "squash"), self.get(BACKBONES[0], "center_crop")))


def front(X: np.ndarray) -> np.ndarray:
    """The product's logreg front (its pipeline without the classifier: signed sqrt + L2), stateless."""
    from featurepipe.heads import make_head

    return make_head("logreg", {}, 0)[:-1].fit_transform(X)


def logreg(C: float = 100.0):
    """The logistic regression behind every logreg figure here (on features already through `front`)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000)


def oof_proba(make, X, y, folds) -> np.ndarray:
    """Out-of-fold class probabilities of the estimator `make()` builds."""
    proba = np.zeros((len(y), int(y.max()) + 1))
    for f in folds:
        proba[f.val_idx] = make().fit(X[f.train_idx], y[f.train_idx]).predict_proba(X[f.val_idx])
    return proba


def accuracy(proba, y) -> float:
    return round(float(np.mean(np.argmax(proba, axis=1) == y)), 4)


def _heads():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import RidgeClassifier
    from sklearn.svm import SVC

    class Ridge(RidgeClassifier):       # decision values as scores: only the argmax is used
        def predict_proba(self, X):
            return self.decision_function(X)

    return {"logreg": logreg,
            "lda_shrinkage": lambda: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
            "svm_rbf": lambda: SVC(C=10, probability=True, random_state=0),
            "ridge": lambda: Ridge(alpha=0.1)}


def part_heads(feats: Features, folds) -> dict:
    y, heads, out = feats.y, _heads(), {}
    sets = {name: front(feats.get(name)) for name in BACKBONES}
    sets["lite0+lite1+lite2"] = np.hstack(list(sets.values()))
    for set_name, X in sets.items():
        out[set_name] = {h: accuracy(oof_proba(make, X, y, folds), y) for h, make in heads.items()}
    return out


def _vote_sets(feats: Features) -> list[np.ndarray]:
    policies = ("squash",) if feats.square else ("squash", "center_crop", "letterbox")
    return [feats.get(name, policy) for name in BACKBONES for policy in policies]


def part_votes(feats: Features, folds) -> dict:
    from sklearn.svm import SVC

    y, sets = feats.y, [front(X) for X in _vote_sets(feats)]
    members = {"logreg": logreg}
    for C in (1, 10, 100):
        members[f"svm_rbf C={C}"] = lambda C=C: SVC(C=C, probability=True, random_state=0)
    proba = {m: [oof_proba(make, X, y, folds) for X in sets] for m, make in members.items()}
    out = {f"vote {m}": accuracy(sum(p), y) for m, p in proba.items()}
    for C in (1, 10, 100):
        out[f"vote logreg + svm_rbf C={C}"] = accuracy(sum(proba["logreg"]) + sum(proba[f"svm_rbf C={C}"]), y)
    out["feature_sets"] = len(sets)
    return out


def part_fronts(feats: Features, folds) -> dict:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    from featurepipe.heads import SignedSqrt

    y, sets, out = feats.y, _vote_sets(feats), {}
    fronts = {"sqrt + L2 (today)": lambda: [SignedSqrt(), Normalizer()],
              "sqrt + centre + L2": lambda: [SignedSqrt(), StandardScaler(with_std=False), Normalizer()],
              "sqrt + L2 + centre + L2": lambda: [SignedSqrt(), Normalizer(), StandardScaler(with_std=False), Normalizer()]}
    for name, steps in fronts.items():
        for C in (10, 100):
            make = lambda steps=steps, C=C: make_pipeline(*steps(), logreg(C))
            out[f"{name}, C={C}"] = accuracy(sum(oof_proba(make, X, y, folds) for X in sets), y)
    return out


def part_selection(feats: Features, folds) -> dict:
    y, sets = feats.y, [front(X) for X in _vote_sets(feats)]
    n_classes, fold_of = int(y.max()) + 1, np.zeros(len(y), dtype=int)
    for k, f in enumerate(folds):
        fold_of[f.val_idx] = k
    fits: dict = {}

    def proba(s: int, C: float, held_out: frozenset) -> np.ndarray:
        """Probabilities on the held-out folds' rows of set s's logreg trained on the other folds."""
        if (s, C, held_out) not in fits:
            test = np.isin(fold_of, list(held_out))
            out = np.zeros((len(y), n_classes))
            out[test] = logreg(C).fit(sets[s][~test], y[~test]).predict_proba(sets[s][test])
            fits[(s, C, held_out)] = out
        return fits[(s, C, held_out)]

    def inner(score_of, k: int) -> tuple[float, float]:
        """(-accuracy, log loss) over the inner folds of outer fold k: lower is better."""
        accs, losses = [], []
        for j in range(len(folds)):
            if j != k:
                p, rows = score_of(frozenset({j, k})), fold_of == j
                accs.append(np.mean(np.argmax(p[rows], axis=1) == y[rows]))
                losses.append(-np.mean(np.log(np.clip(p[rows][np.arange(rows.sum()), y[rows]], 1e-15, 1.0))))
        return -float(np.mean(accs)), float(np.mean(losses))

    every = range(len(sets))
    vote = lambda C, held_out: sum(proba(s, C, held_out) for s in every) / len(sets)
    procedures = {
        "each set's own C (today)": lambda k: [(s, min(C_GRID, key=lambda C: inner(lambda h: proba(s, C, h), k)))
                                               for s in every],
        "one C for all sets": lambda k: [(s, min(C_GRID, key=lambda C: inner(lambda h: vote(C, h), k))) for s in every],
        "every C in the vote": lambda k: [(s, C) for s in every for C in C_GRID],
        "C = 10": lambda k: [(s, 10.0) for s in every],
        "C = 100": lambda k: [(s, 100.0) for s in every]}
    out = {}
    for name, members_for in procedures.items():
        right = 0
        for k in range(len(folds)):
            p = sum(proba(s, C, frozenset({k})) for s, C in members_for(k))
            right += int(np.sum(np.argmax(p[fold_of == k], axis=1) == y[fold_of == k]))
        out[name] = round(right / len(y), 4)
    return out


def pooled_variants(maps: np.ndarray) -> dict:
    """Pooling variants of (n, s, s, c) feature maps; each part signed-sqrt + L2, parts concatenated."""
    s = maps.shape[1]
    half = (s + 1) // 2
    glob = front(maps.mean(axis=(1, 2)))
    quads = [front(maps[:, a:a + half, b:b + half].mean(axis=(1, 2))) for a in (0, s - half) for b in (0, s - half)]
    bands = [front(maps[:, i * s // 3:(i + 1) * s // 3 + (i < 2)].mean(axis=(1, 2))) for i in range(3)]
    return {"global average (today)": glob,
            "global + 4 quadrants": np.hstack([glob] + [q / 2 for q in quads]),
            "4 quadrants": np.hstack(quads) / 2,
            "global + 3 bands": np.hstack([glob] + [b / np.sqrt(3) for b in bands]),
            "global average + global max": np.hstack([glob, front(maps.max(axis=(1, 2)))])}


def part_pooling(feats: Features, folds) -> dict:
    y, out = feats.y, {}
    for name in BACKBONES[:2]:
        flat = feats.get(name, pooling="flatten")
        side = int(round(np.sqrt(flat.shape[1] / 1280)))
        for variant, X in pooled_variants(flat.reshape(len(flat), side, side, 1280)).items():
            out[f"{name}: {variant}"] = accuracy(
                oof_proba(logreg, X, y, folds), y)
    return out


def part_sizes(feats: Features, folds) -> dict:
    from sklearn.preprocessing import Normalizer

    from featurepipe.backbones.registry import get_backbone

    y, out = feats.y, {}
    for name in BACKBONES[:2]:
        default = get_backbone(name).default_size
        by_size = {size: front(feats.get(name, size=size)) for size in (128, 176, default, 288)}
        for size, X in by_size.items():
            out[f"{name} @{size}"] = accuracy(oof_proba(logreg, X, y, folds), y)
        three = [by_size[176], by_size[default], by_size[288]]
        out[f"{name} @176+{default}+288 concatenated"] = accuracy(oof_proba(logreg, np.hstack(three), y, folds), y)
        out[f"{name} @176+{default}+288 averaged"] = accuracy(oof_proba(logreg, Normalizer().fit_transform(sum(three)), y, folds), y)
    return out


def part_headconv(feats: Features, folds, epochs: int = 12) -> dict:
    """Lite0's head_conv (+ its frozen BatchNorm, ReLU6, average pool, sqrt + L2) and the logreg head,
    both initialized from what the frozen pipeline has, trained together on cached blocks_15 maps."""
    import keras

    from featurepipe.backbones.build import build_feature_model
    from featurepipe.backbones.spec import BackboneSpec

    name = BACKBONES[0]
    base = next(layer for layer in build_feature_model(BackboneSpec(name=name), feats.cache).layers
                if hasattr(layer, "layers"))
    conv, bn = base.get_layer("head_conv"), base.get_layer("head_bn")
    y, n_classes = feats.y, int(feats.y.max()) + 1
    flat = feats.get(name, pooling="flatten", layer="blocks_15_project_bn")
    side = int(round(np.sqrt(flat.shape[1] / 320)))
    maps = flat.reshape(len(flat), side, side, 320).astype("float32")
    pooled = front(feats.get(name))

    def model(lr_head):
        maps_in = keras.Input((side, side, 320))
        x = keras.layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(maps_in)
        x = keras.layers.BatchNormalization(epsilon=bn.epsilon, name="head_bn", trainable=False)(x, training=False)
        x = keras.layers.ReLU(max_value=6.0)(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Lambda(lambda t: keras.ops.sign(t) * keras.ops.sqrt(keras.ops.abs(t) + 1e-12))(x)
        x = keras.layers.UnitNormalization()(x)
        out = keras.layers.Dense(n_classes, activation="softmax", name="logreg")(x)
        m = keras.Model(maps_in, out)
        m.get_layer("head_conv").set_weights(conv.get_weights())
        m.get_layer("head_bn").set_weights(bn.get_weights())
        m.get_layer("logreg").set_weights([lr_head.coef_.T.astype("float32"), lr_head.intercept_.astype("float32")])
        m.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4), loss="sparse_categorical_crossentropy")
        return m

    curve = np.zeros(epochs + 1)
    for f in folds:
        keras.utils.set_random_seed(0)
        head = logreg().fit(pooled[f.train_idx], y[f.train_idx])
        m = model(head)
        for epoch in range(epochs + 1):
            if epoch:
                m.fit(maps[f.train_idx], y[f.train_idx], epochs=1, batch_size=32, verbose=0)
            right = np.argmax(m.predict(maps[f.val_idx], verbose=0), axis=1) == y[f.val_idx]
            curve[epoch] += right.sum()
    return {"frozen logreg C=100": accuracy(oof_proba(logreg, pooled, y, folds), y),
            "accuracy after epoch 0..N": [round(float(c) / len(y), 4) for c in curve]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=None, help="a folder, fmnistN[:seed] or demoN:seed")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)   # SVC(probability=True), deprecated in 1.9
    from benchmarks.datasets import named
    from featurepipe.evaluation.crossval import make_folds

    with tempfile.TemporaryDirectory(prefix="featurepipe-ceiling-") as scratch:
        cache = args.cache_dir or Path(scratch) / "cache"
        for name in args.data or [str(REPO / "data" / "demo"), "fmnist30"]:
            feats = Features(named(name, Path(scratch), REPO / "data" / "demo"), cache)
            feats.get(BACKBONES[0])
            folds = make_folds(feats.y, n_folds=5, seed=0)
            for part in parts:
                figures = globals()[f"part_{part}"](feats, folds)
                print(json.dumps({"data": name, "images": len(feats.y), "part": part, "figures": figures}), flush=True)


if __name__ == "__main__":
    main()
