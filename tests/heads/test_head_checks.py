"""scikit-learn's estimator checks on what every registered head builds (its defaults, or the fast
params of tests/head_support.py). A check a head cannot pass by design is listed with its reason;
everything else must pass."""

from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurepipe.heads import entry_for_estimator, head_names, make_head
from tests.head_support import fast_params

# scikit-learn's Pipeline fits the estimators in its `steps` parameter in place, so a fitted
# pipeline's params differ from the unfitted one's; scikit-learn does not run these two checks on
# Pipeline either. Every head but dense and ensemble is a pipeline behind a feature front.
PIPELINE = {
    "check_estimators_overwrite_params": "Pipeline fits the estimators in its steps parameter in place",
    "check_dont_overwrite_parameters": "Pipeline fits the estimators in its steps parameter in place",
}
# NearestClassMean.decision_function gives one column per class for two classes too (the scores
# predict_proba softmaxes); scikit-learn's binary convention is a single column. Kept as it is: a
# renovation does not change what a public method returns.
BINARY_DECISION = "decision_function has one column per class, also for two classes"
BY_HEAD = {
    "ncm": {
        "check_classifiers_train": BINARY_DECISION,
        "check_classifiers_classes": BINARY_DECISION,
        "check_decision_proba_consistency": BINARY_DECISION,
    },
}


def expected_failures(estimator) -> dict:
    entry = entry_for_estimator(estimator)
    return {**(PIPELINE if isinstance(estimator, Pipeline) else {}), **BY_HEAD.get(entry.name if entry else "", {})}


@parametrize_with_checks([make_head(name, fast_params(name)) for name in head_names()],
                         expected_failed_checks=expected_failures)
def test_every_head_passes_the_sklearn_estimator_checks(estimator, check):
    check(estimator)
