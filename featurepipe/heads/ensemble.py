"""The ensemble head: a soft vote (mean probabilities) of other registered heads on one feature set.

The search picks its members (its top configurations); SoftVoteClassifier is pickled inside
fitted heads and builds its members through the registry, so any registered head can vote.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from featurepipe.core.errors import UsageError
from featurepipe.heads.linear import PICKLED_AS
from featurepipe.heads.registry import head_entry, make_head, register_head


class SoftVoteClassifier(ClassifierMixin, BaseEstimator):
    """The mean of its members' predict_proba: the ensemble head of the searched pipeline.

    members: [(head name, params), ...] from the registry; all are fitted on the same rows.
    """

    __module__ = PICKLED_AS     # see featurepipe.heads.linear

    def __init__(self, members=(), random_state: int = 0):
        self.members = members
        self.random_state = random_state

    def fit(self, X, y):
        if len(self.members) < 2:
            raise UsageError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        self.estimators_ = [make_head(name, params, self.random_state).fit(X, y) for name, params in self.members]
        self.classes_ = self.estimators_[0].classes_
        self.n_features_in_ = self.estimators_[0].n_features_in_
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "estimators_")
        return np.mean([e.predict_proba(X) for e in self.estimators_], axis=0)

    def predict(self, X):
        proba = self.predict_proba(X)     # first: an unfitted vote raises NotFittedError, not AttributeError
        return self.classes_[proba.argmax(axis=1)]


@register_head(
    "ensemble",
    defaults={"members": []},
    default_grid={"members": [[]]},
    description="Soft vote (mean probabilities) of the search's top configurations on one feature set.",
    final_step="SoftVoteClassifier",
    to_keras="featurepipe.heads.to_keras:soft_vote_to_keras",
)
def _ensemble(p: Mapping, seed: int):
    members = [(str(m["head"]), dict(m.get("params") or {})) for m in p["members"]]
    for name, _ in members:
        if name == "ensemble":
            raise UsageError("an ensemble cannot contain an ensemble")
        head_entry(name)
    return SoftVoteClassifier(members=members, random_state=seed)
