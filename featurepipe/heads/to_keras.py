"""A fitted head (scikit-learn pipeline or DenseHeadClassifier) as an equivalent Keras model.

`head_to_keras(estimator, n_features)` maps features (n, d) to the same class probabilities as
`estimator.predict_proba` (float32, so to ~1e-6). Fine-tuning starts from it, so the combined
image -> probabilities model is exactly the evaluated head on a frozen base before its first step,
and export can ship the head inside one Keras file.

Supported: Pipeline steps StandardScaler / Normalizer(l2) / SignedSqrt / passthrough, ending in
LogisticRegression, CalibratedClassifierCV(method="sigmoid") over a linear model (LinearSVC,
LogisticRegression, ...), or a DenseHeadClassifier (also bare, outside a pipeline).

Importing this module registers the custom layers that featurepipe's Keras files need
(`PlattOneVsRest`, `NeighbourVote`, `SignedSqrt`, and from featurepipe.backbones.layers `Preprocess` and
`InferenceMode`), so
`keras.saving.load_model(path, safe_mode=True)` works after `import featurepipe.heads.to_keras`
(featurepipe's own files: fine-tuned models, dense heads). Exports need no import: deploy.plain
re-expresses these layers with Keras' built-ins before writing.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

import featurepipe.backbones.layers  # noqa: F401  (registers Preprocess and InferenceMode for load_model)
from featurepipe.core.errors import FeaturepipeError
from featurepipe.heads.linear import SignedSqrt as SignedSqrtStep
from featurepipe.heads.neighbours import KNN_MIN_DISTANCE
from featurepipe.heads.registry import entry_for_estimator, keras_converter

SUPPORTED = (
    "Pipeline of StandardScaler / Normalizer(norm='l2') / SignedSqrt ending in LogisticRegression, "
    "CalibratedClassifierCV(method='sigmoid') over a linear model, CosineKNN or NearestClassMean; "
    "DenseHeadClassifier; SoftVoteClassifier of these"
)
# The head is a few small matrices: float32 even under a mixed_float16 policy, so converted
# probabilities stay within float32 rounding of predict_proba and the softmax stays stable.
_HEAD_DTYPE = "float32"


@keras.saving.register_keras_serializable(package="featurepipe")
class PlattOneVsRest(keras.layers.Layer):
    """CalibratedClassifierCV(method="sigmoid").predict_proba on scores whose Platt scaling is
    already folded into the preceding Dense layer (z = -(a * decision + b)).

    Input (n, members * columns): per ensemble member, one column (binary) or one per class.
    Per member: p = sigmoid(z); binary gives [1 - p, p], multiclass masks the classes the member
    never saw and divides by the row sum (uniform where every class is 0, as scikit-learn does).
    The output is the mean over members.
    """

    def __init__(self, members: int, classes: int, mask=None, **kwargs):
        super().__init__(**kwargs)
        self.members = int(members)
        self.classes = int(classes)
        self.binary = self.classes == 2
        columns = 1 if self.binary else self.classes
        if mask is None:
            mask = np.ones((self.members, columns), dtype=np.float32)
        self.mask = np.asarray(mask, dtype=np.float32).reshape(self.members, columns)

    def call(self, inputs):
        z = ops.cast(inputs, self.compute_dtype)
        p = ops.sigmoid(z)
        if self.binary:
            p = ops.stack([1.0 - p, p], axis=-1)                      # (n, members, 2)
        else:
            p = ops.reshape(p, (-1, self.members, self.classes)) * ops.convert_to_tensor(self.mask, p.dtype)
            total = ops.sum(p, axis=-1, keepdims=True)
            uniform = ops.ones_like(p) / float(self.classes)
            p = ops.where(total > 0, p / ops.where(total > 0, total, ops.ones_like(total)), uniform)
        return ops.mean(p, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.classes)

    def get_config(self):
        return {**super().get_config(), "members": self.members, "classes": self.classes,
                "mask": self.mask.tolist()}


# ------------------------------------------------------------------------------------------------
# conversion


@keras.saving.register_keras_serializable(package="featurepipe")
class NeighbourVote(keras.layers.Layer):
    """CosineKNN.predict_proba from cosine similarities to the training rows (n, n_train):
    the k most similar rows vote for their class with weight 1 / distance."""

    def __init__(self, k: int, onehot, min_distance: float, **kwargs):
        super().__init__(**kwargs)
        self.k = int(k)
        self.onehot = np.asarray(onehot, dtype=np.float32)
        self.min_distance = float(min_distance)

    def call(self, sims):
        top, index = ops.top_k(ops.cast(sims, self.compute_dtype), k=self.k)
        dist = ops.sqrt(ops.maximum(2.0 - 2.0 * top, 0.0))
        weights = 1.0 / ops.maximum(dist, self.min_distance)
        votes = ops.einsum("nk,nkc->nc", weights, ops.take(ops.convert_to_tensor(self.onehot), index, axis=0))
        return votes / ops.sum(votes, axis=-1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "onehot": self.onehot.tolist(), "min_distance": self.min_distance}


@keras.saving.register_keras_serializable(package="featurepipe")
class SignedSqrt(keras.layers.Layer):
    """heads.linear.signed_sqrt: sign(x) * sqrt(|x|), linear below eps, so the slope at 0 is finite (the
    maximum inside the sqrt keeps the unused branch's gradient finite too)."""

    def __init__(self, eps: float, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        a = ops.abs(x)
        return ops.sign(x) * ops.where(a >= self.eps, ops.sqrt(ops.maximum(a, self.eps)), a / float(np.sqrt(self.eps)))

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


def _unsupported(what) -> FeaturepipeError:
    return FeaturepipeError(f"cannot convert {what} to a Keras head; supported: {SUPPORTED}")


def _steps(estimator) -> list:
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        steps = [step for _, step in estimator.steps if step is not None and step != "passthrough"]
        nested = []
        for step in steps:
            nested.extend(_steps(step) if isinstance(step, Pipeline) else [step])
        return nested
    return [estimator]


def _linear_params(model) -> tuple[np.ndarray, np.ndarray]:
    """(W (d, k), b (k,)) with decision_function(X) == X @ W + b (k == 1 for a binary model)."""
    coef = getattr(model, "coef_", None)
    intercept = getattr(model, "intercept_", None)
    if coef is None or intercept is None or not hasattr(model, "decision_function"):
        raise _unsupported(f"{type(model).__name__} (not a fitted linear model with coef_ / intercept_)")
    coef = np.asarray(coef.toarray() if hasattr(coef, "toarray") else coef, dtype=np.float64)
    coef = coef.reshape(1, -1) if coef.ndim == 1 else coef
    intercept = np.broadcast_to(np.asarray(intercept, dtype=np.float64).reshape(-1), (coef.shape[0],))
    return coef.T.copy(), intercept.copy()


class _Affine:
    """x -> (x - shift) * scale, pending until it can be folded into the next Dense layer."""

    def __init__(self, n_features: int):
        self.shift = np.zeros(n_features)
        self.scale = np.ones(n_features)
        self.identity = True

    def add_scaler(self, scaler) -> None:
        mean = scaler.mean_ if scaler.with_mean else None
        scale = scaler.scale_ if scaler.with_std else None
        # x' = (x - shift) * s; then (x' - m) / c = (x - (shift + m / s)) * (s / c)
        if mean is not None:
            self.shift = self.shift + np.asarray(mean, dtype=np.float64) / self.scale
        if scale is not None:
            self.scale = self.scale / np.asarray(scale, dtype=np.float64)
        self.identity = False

    def fold(self, kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense(kernel, bias) applied after this affine map, as one Dense on the raw input."""
        if self.identity:
            return kernel, bias
        folded = kernel * self.scale[:, None]
        return folded, bias - (self.shift * self.scale) @ kernel

    def layer(self, name: str):
        """The affine map as a (non-trainable) Normalization layer, for when it cannot be folded."""
        return keras.layers.Normalization(mean=self.shift, variance=1.0 / self.scale ** 2,
                                          name=name, dtype=_HEAD_DTYPE)


def _dense(x, kernel: np.ndarray, bias: np.ndarray, name: str, activation=None):
    layer = keras.layers.Dense(kernel.shape[1], activation=activation, name=name, dtype=_HEAD_DTYPE)
    y = layer(x)
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return y


def _logistic_output(x, model, affine: _Affine):
    w, b = _linear_params(model)
    n_classes = len(model.classes_)
    multi_class = getattr(model, "multi_class", "auto")
    # scikit-learn < 1.8 fitted one-vs-rest models for multi_class="ovr", and for liblinear under
    # "auto"/"deprecated"; later versions are always multinomial.
    liblinear = getattr(model, "solver", "") == "liblinear"
    ovr = multi_class == "ovr" or (multi_class in ("auto", "deprecated") and liblinear)
    if n_classes == 2:
        # expit(z) for class 1 == softmax([0, z]): an exact two-column softmax.
        kernel = np.concatenate([np.zeros_like(w), w], axis=1)
        bias = np.concatenate([np.zeros_like(b), b])
        return _dense(x, *affine.fold(kernel, bias), name="logits", activation="softmax")
    if ovr:
        # Old scikit-learn OvR logistic regression: sigmoid per class, normalised by the row sum.
        z = _dense(x, *affine.fold(w, b), name="scores")
        return PlattOneVsRest(1, n_classes, name="probabilities", dtype=_HEAD_DTYPE)(z)
    return _dense(x, *affine.fold(w, b), name="logits", activation="softmax")


def _calibrated_output(x, model, affine: _Affine):
    from sklearn.preprocessing import LabelEncoder

    if getattr(model, "method", None) != "sigmoid":
        raise _unsupported(f"CalibratedClassifierCV(method={getattr(model, 'method', None)!r})")
    classes = np.asarray(model.classes_)
    n_classes = len(classes)
    binary = n_classes == 2
    columns = 1 if binary else n_classes
    kernels, biases, masks = [], [], []
    for member in model.calibrated_classifiers_:
        w, b = _linear_params(member.estimator)
        kernel = np.zeros((w.shape[0], columns))
        bias = np.zeros(columns)
        mask = np.zeros(columns)
        positions = LabelEncoder().fit(member.classes).transform(member.estimator.classes_)
        if binary:
            positions = [0]   # one calibrator, on the score of classes_[1]
        for column, position in enumerate(positions[: w.shape[1]]):
            calibrator = member.calibrators[column]
            a, c = float(calibrator.a_), float(calibrator.b_)
            # Platt: sigmoid(-(a * (x.w + b) + c)) -> one affine map, then sigmoid
            kernel[:, position] = -a * w[:, column]
            bias[position] = -(a * b[column] + c)
            mask[position] = 1.0
        kernels.append(kernel)
        biases.append(bias)
        masks.append(mask)
    z = _dense(x, *affine.fold(np.concatenate(kernels, axis=1), np.concatenate(biases)), name="platt_scores")
    return PlattOneVsRest(len(kernels), n_classes, mask=np.stack(masks), name="probabilities", dtype=_HEAD_DTYPE)(z)


def _dense_head_output(x, model, affine: _Affine):
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(model, "model_")
    if not affine.identity:
        x = affine.layer("standardize_out")(x)
    hidden, dropout, output = (model.model_.get_layer(n) for n in ("hidden", "dropout", "output"))
    h = _dense(x, *[np.asarray(w) for w in hidden.get_weights()], name="hidden", activation="relu")
    h = keras.layers.Dropout(float(dropout.rate), name="dropout", dtype=_HEAD_DTYPE)(h)
    return _dense(h, *[np.asarray(w) for w in output.get_weights()], name="output", activation="softmax")


def _knn_output(x, model):
    # x is already unit-norm (the pipeline's Normalizer); the training rows are too.
    sims = _dense(x, model.train_.T, np.zeros(len(model.train_)), name="cosine_to_train")
    return NeighbourVote(model.k_, model.onehot_, KNN_MIN_DISTANCE, name="probabilities", dtype=_HEAD_DTYPE)(sims)


def _ncm_output(x, model):
    x = keras.layers.UnitNormalization(name="unit_rows", dtype=_HEAD_DTYPE)(x)
    return _dense(x, model.temperature * model.means_.T, np.zeros(len(model.means_)), name="logits",
                  activation="softmax")


def _transforms_then(output):
    """A converter for a Pipeline of StandardScaler / Normalizer(l2) steps ending in a final step
    that `output(x, final, affine)` converts (the pending affine map folded in where it can be)."""

    def convert(estimator, n_features: int, name: str) -> "keras.Model":
        from sklearn.preprocessing import Normalizer, StandardScaler

        steps = _steps(estimator)
        n_in = getattr(steps[0], "n_features_in_", None)
        if n_in is not None and int(n_in) != int(n_features):
            raise FeaturepipeError(f"the head was fitted on {n_in} features, but the base gives {n_features}; "
                                   f"was the run made with another backbone or layer?")
        inputs = keras.Input((int(n_features),), name="features", dtype=_HEAD_DTYPE)
        x = inputs
        affine = _Affine(int(n_features))
        *transforms, final = steps
        for index, step in enumerate(transforms):
            if isinstance(step, StandardScaler):
                affine.add_scaler(step)
                continue
            if isinstance(step, Normalizer):
                if step.norm != "l2":
                    raise _unsupported(f"Normalizer(norm={step.norm!r})")
                layer = keras.layers.UnitNormalization(name=f"l2_normalize_{index}", dtype=_HEAD_DTYPE)
            elif isinstance(step, SignedSqrtStep):
                layer = SignedSqrt(step.eps, name=f"signed_sqrt_{index}", dtype=_HEAD_DTYPE)
            else:
                raise _unsupported(f"a pipeline step {type(step).__name__}")
            # A non-linear step: the pending affine map must be applied before it, not folded past it.
            if not affine.identity:
                x = affine.layer(f"standardize_{index}")(x)
                affine = _Affine(int(n_features))
            x = layer(x)
        return keras.Model(inputs, output(x, final, affine), name=name)

    return convert


def _unfolded(output):
    """`output(x, model)` for a final step that takes the affine map applied, not folded."""

    def apply(x, model, affine: _Affine):
        if not affine.identity:
            x = affine.layer("standardize_out")(x)
        return output(x, model)

    return apply


# The converters the registry's entries name in `to_keras` ("featurepipe.heads.to_keras:<name>").
logistic_to_keras = _transforms_then(_logistic_output)
calibrated_linear_to_keras = _transforms_then(_calibrated_output)
dense_head_to_keras = _transforms_then(_dense_head_output)
knn_to_keras = _transforms_then(_unfolded(_knn_output))
ncm_to_keras = _transforms_then(_unfolded(_ncm_output))


def soft_vote_to_keras(estimator, n_features: int, name: str) -> "keras.Model":
    """The mean of the members' converted heads."""
    inputs = keras.Input((int(n_features),), name="features", dtype=_HEAD_DTYPE)
    members = [head_to_keras(e, n_features, name=f"{name}_member{i}")(inputs)
               for i, e in enumerate(estimator.estimators_)]
    return keras.Model(inputs, keras.layers.Average(name="soft_vote", dtype=_HEAD_DTYPE)(members), name=name)


def head_to_keras(estimator, n_features: int, name: str = "head") -> "keras.Model":
    """A Keras model: float features (n, n_features) -> `estimator.predict_proba` (columns in
    `estimator.classes_` order). Trainable, serializable (safe_mode) and independent of sklearn.
    The conversion is the `to_keras` of the registered head whose estimator this is."""
    steps = _steps(estimator)
    if not steps:
        raise _unsupported("an empty pipeline")
    entry = entry_for_estimator(estimator)
    convert = keras_converter(entry) if entry is not None else None
    if convert is None:
        raise _unsupported(type(steps[-1]).__name__)
    return convert(estimator, n_features, name)
