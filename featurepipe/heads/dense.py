"""The dense head: the seeds' small Keras network (Dense -> Dropout -> softmax) as a scikit-learn
classifier, registered as "dense" (saved as a .keras file, fitted in the calling process).

Keras/TensorFlow are imported inside the methods that need them, so that importing
`featurepipe.heads` (and joblib workers running the scikit-learn heads) never loads TensorFlow.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from featurepipe.core.errors import UsageError
from featurepipe.heads.registry import register_head

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data
except ImportError:  # pragma: no cover - older scikit-learn: the same check as a method
    def validate_data(estimator, X, y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)

_PREDICT_CHUNK = 8192


def build_model(n_features: int, hidden_units: int, n_classes: int, dropout: float):
    """The head's architecture; the only place it is defined (fit, unpickling and loading all use it)."""
    import keras

    return keras.Sequential(
        [
            keras.Input((n_features,), name="features"),
            keras.layers.Dense(hidden_units, activation="relu", name="hidden"),
            keras.layers.Dropout(dropout, name="dropout"),
            keras.layers.Dense(n_classes, activation="softmax", name="output"),
        ],
        name="dense_head",
    )


def _initial_weights(n_features: int, hidden_units: int, n_classes: int, seed: int) -> list[np.ndarray]:
    # Drawn with numpy (Glorot uniform, zero biases: Keras' defaults) so that a fit is
    # reproducible from `random_state` alone, without touching Keras' global seed state.
    rng = np.random.default_rng(seed)

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)

    return [
        glorot(n_features, hidden_units),
        np.zeros(hidden_units, np.float32),
        glorot(hidden_units, n_classes),
        np.zeros(n_classes, np.float32),
    ]


class _Trainer:
    """Variables, Adam state and a traced epoch function for one architecture.

    Kept in a small cache and reset for every fit, because tracing a fresh tf.function per fit
    costs about as much as training the head on a few thousand rows.
    """

    def __init__(self, n_features: int, hidden_units: int, n_classes: int, dropout: float, batch_size: int):
        import keras
        import tensorflow as tf

        self.lock = threading.Lock()
        self.model = build_model(n_features, hidden_units, n_classes, dropout)
        self.variables = self.model.trainable_variables
        self.optimizer = keras.optimizers.Adam(learning_rate=1e-3)
        self.optimizer.build(self.variables)
        hidden, output = self.model.get_layer("hidden"), self.model.get_layer("output")

        def mean_loss(y, p):
            return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, p))

        x_spec = tf.TensorSpec([None, n_features], tf.float32)
        y_spec = tf.TensorSpec([None], tf.int32)
        seed_spec = tf.TensorSpec([2], tf.int32)

        @tf.function(input_signature=[x_spec, y_spec, seed_spec])
        def train_epoch(x, y, seed):
            n = tf.shape(x)[0]
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seed)
            n_batches = (n + batch_size - 1) // batch_size
            total = tf.constant(0.0)
            for i in tf.range(n_batches):
                idx = order[i * batch_size : tf.minimum((i + 1) * batch_size, n)]
                xb, yb = tf.gather(x, idx), tf.gather(y, idx)
                # Stateless dropout: the mask depends only on (seed, epoch, step), never on how
                # many fits ran before in this process.
                step_seed = tf.random.experimental.stateless_fold_in(seed, i + 1)
                with tf.GradientTape() as tape:
                    h = hidden(xb)
                    if dropout > 0:
                        h = tf.nn.experimental.stateless_dropout(h, rate=dropout, seed=step_seed)
                    loss = mean_loss(yb, output(h))
                grads = tape.gradient(loss, self.variables)
                self.optimizer.apply_gradients(zip(grads, self.variables))
                total += loss
            return total / tf.cast(n_batches, tf.float32)

        @tf.function(input_signature=[x_spec, y_spec])
        def eval_loss(x, y):
            return mean_loss(y, self.model(x, training=False))

        self.train_epoch = train_epoch
        self.eval_loss = eval_loss

    def run(self, x_tr, y_tr, x_es, y_es, *, seed: int, learning_rate: float, epochs: int, patience: int):
        """Train from fresh weights; early-stop on (x_es, y_es) and return the best weights and history."""
        import tensorflow as tf

        n_features, hidden_units = self.variables[0].shape
        n_classes = self.variables[2].shape[1]
        for var, value in zip(self.variables, _initial_weights(n_features, hidden_units, n_classes, seed)):
            var.assign(value)
        for var in self.optimizer.variables:
            var.assign(np.zeros(var.shape, dtype=var.dtype))
        self.optimizer.learning_rate = learning_rate

        x_tr, y_tr = tf.constant(x_tr), tf.constant(y_tr)
        x_es, y_es = tf.constant(x_es), tf.constant(y_es)
        history: dict[str, list[float]] = {"loss": [], "val_loss": []}
        best_loss, best_epoch, best_weights = np.inf, 0, [v.numpy() for v in self.variables]
        for epoch in range(epochs):
            epoch_seed = tf.constant([seed, epoch], tf.int32)
            history["loss"].append(float(self.train_epoch(x_tr, y_tr, epoch_seed)))
            val_loss = float(self.eval_loss(x_es, y_es))
            history["val_loss"].append(val_loss)
            if val_loss < best_loss:
                best_loss, best_epoch, best_weights = val_loss, epoch, [v.numpy() for v in self.variables]
            elif epoch - best_epoch >= patience:
                break
        return best_weights, history, best_epoch


_TRAINERS: "OrderedDict[tuple, _Trainer]" = OrderedDict()
_TRAINERS_LOCK = threading.Lock()
_MAX_TRAINERS = 8  # a 1280x256 head with its Adam state is ~4 MB


def _trainer(n_features: int, hidden_units: int, n_classes: int, dropout: float, batch_size: int) -> _Trainer:
    key = (n_features, hidden_units, n_classes, float(dropout), batch_size)
    with _TRAINERS_LOCK:
        trainer = _TRAINERS.pop(key, None)
        if trainer is None:
            trainer = _Trainer(*key)
        _TRAINERS[key] = trainer
        while len(_TRAINERS) > _MAX_TRAINERS:
            _TRAINERS.popitem(last=False)
        return trainer


def _early_stopping_split(y: np.ndarray, fraction: float, seed: int):
    """Stratified (train, holdout) indices; None when the data is too small to hold any out."""
    n_classes = len(np.unique(y))
    n_holdout = int(np.ceil(fraction * len(y))) if fraction > 0 else 0
    if n_holdout < n_classes or len(y) - n_holdout < n_classes or np.bincount(y).min() < 2:
        return None
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_holdout, random_state=seed)
    return next(splitter.split(np.zeros((len(y), 1)), y))


class DenseHeadClassifier(ClassifierMixin, BaseEstimator):
    """Dense(hidden_units, relu) -> Dropout -> Dense(n_classes, softmax), Adam on sparse categorical
    cross-entropy, early-stopped on a stratified holdout of the training rows (best weights kept).

    When the training set is too small for a stratified holdout (fewer than two rows in some class),
    early stopping watches the training loss instead.
    """

    def __init__(
        self,
        hidden_units: int = 256,
        dropout: float = 0.5,
        learning_rate: float = 1e-3,
        epochs: int = 100,
        batch_size: int = 32,
        patience: int = 10,
        validation_fraction: float = 0.15,
        random_state: Any = 0,
    ):
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _check_params(self) -> None:
        if int(self.hidden_units) < 1 or int(self.epochs) < 1 or int(self.batch_size) < 1 or int(self.patience) < 0:
            raise UsageError("hidden_units, epochs and batch_size must be >= 1 and patience >= 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise UsageError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if float(self.learning_rate) <= 0:
            raise UsageError(f"learning_rate must be > 0, got {self.learning_rate!r}")

    def fit(self, X, y):
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"DenseHeadClassifier needs samples of at least 2 classes; y has 1 class ({self.classes_[0]!r})")
        y_enc = y_enc.astype(np.int32)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

        split = _early_stopping_split(y_enc, float(self.validation_fraction), seed)
        if split is None:
            x_tr, y_tr, x_es, y_es = X, y_enc, X, y_enc
        else:
            tr, es = split
            x_tr, y_tr, x_es, y_es = X[tr], y_enc[tr], X[es], y_enc[es]

        trainer = _trainer(self.n_features_in_, int(self.hidden_units), len(self.classes_), float(self.dropout), int(self.batch_size))
        with trainer.lock:
            weights, history, best_epoch = trainer.run(
                x_tr, y_tr, x_es, y_es,
                seed=seed, learning_rate=float(self.learning_rate), epochs=int(self.epochs), patience=int(self.patience),
            )
        self.model_ = build_model(self.n_features_in_, int(self.hidden_units), len(self.classes_), float(self.dropout))
        self.model_.set_weights(weights)
        self.history_ = history
        self.best_epoch_ = best_epoch
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        # The inference pass of model_ (dropout is the identity there) in float64 numpy: each row's
        # result then does not depend on the other rows in the batch (TF's float32 kernels differ
        # by ~1e-8 with batch composition), rows sum to 1 to float64 precision, and no TF dispatch.
        w1, b1, w2, b2 = (np.asarray(w, dtype=np.float64) for w in self.model_.get_weights())
        out = np.empty((len(X), len(self.classes_)))
        for i in range(0, len(X), _PREDICT_CHUNK):
            logits = np.maximum(X[i : i + _PREDICT_CHUNK] @ w1 + b1, 0.0) @ w2 + b2
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            out[i : i + _PREDICT_CHUNK] = e / e.sum(axis=1, keepdims=True)
        return out

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    # Pickling stores plain weight arrays: a pickled Keras object would tie the file to the exact
    # Keras/TF build and execute arbitrary code on load.
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns the live __dict__
        model = state.pop("model_", None)
        if model is not None:
            state["_model_arch"] = _architecture(model)
            state["_model_weights"] = [np.asarray(w) for w in model.get_weights()]
        return state

    def __setstate__(self, state):
        state = dict(state)
        arch = state.pop("_model_arch", None)
        weights = state.pop("_model_weights", None)
        super().__setstate__(state)
        if arch is not None:
            self.model_ = build_model(**arch)
            self.model_.set_weights(weights)

    def save_keras(self, path) -> None:
        """Write the fitted network as a `.keras` file (classes are not in it: keep them alongside)."""
        check_is_fitted(self, "model_")
        self.model_.save(str(path))

    @classmethod
    def load_keras(cls, path, classes) -> "DenseHeadClassifier":
        """A fitted classifier from a `.keras` file written by `save_keras` and its class labels."""
        import keras

        model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
        arch = _architecture(model)
        classes = np.asarray(classes)
        if arch["n_classes"] != len(classes):
            raise ValueError(f"{path} has {arch['n_classes']} outputs but {len(classes)} classes were given")
        est = cls(hidden_units=arch["hidden_units"], dropout=arch["dropout"])
        est.classes_ = classes
        est.n_features_in_ = arch["n_features"]
        est.model_ = model
        est.history_ = {}
        return est


def _architecture(model) -> dict:
    try:
        hidden, dropout, output = (model.get_layer(n) for n in ("hidden", "dropout", "output"))
    except ValueError as exc:
        raise ValueError(f"not a featurepipe dense head model ({exc})") from None
    return {
        "n_features": int(hidden.kernel.shape[0]),
        "hidden_units": int(hidden.units),
        "n_classes": int(output.units),
        "dropout": float(dropout.rate),
    }


# DenseHeadClassifier's defaults except batch_size: 128 rather than 32 halves the head's CV time on
# a few thousand rows at the same accuracy (per-step optimizer overhead dominates on CPU), and on
# tens of images both are nearly full-batch anyway.
@register_head(
    "dense",
    defaults={"hidden_units": 256, "dropout": 0.5, "learning_rate": 1e-3, "epochs": 100,
              "batch_size": 128, "patience": 10, "validation_fraction": 0.15},
    default_grid={"hidden_units": [256]},
    description="Keras Dense(256, relu) -> Dropout(0.5) -> softmax, Adam, early-stopped on a stratified holdout.",
    # ~1 s a fit in TensorFlow, and it did not beat tuned logreg on the measured sets: not searched
    # by default, and too slow for the learning curve's ~65 fits.
    expensive=True,
    in_process=True,
    final_step="DenseHeadClassifier",
    to_keras="featurepipe.heads.to_keras:dense_head_to_keras",
    save_format="keras",
    keras_loader="featurepipe.heads.dense:DenseHeadClassifier.load_keras",
)
def _dense(p: Mapping, seed: int):
    return DenseHeadClassifier(**p, random_state=seed)
