"""Forward selection of the vote's members (evaluation.selection), on hand-made probabilities."""

import numpy as np
import pytest
from sklearn.metrics import log_loss

from featurepipe.evaluation.selection import Fold, Picked, eliminate_members, select_members


def _proba(correct: np.ndarray, confidence: float, n_classes: int = 3) -> np.ndarray:
    """Rows that put `confidence` on class 0 where `correct`, else on class 1 (the true class is 0)."""
    out = np.full((len(correct), n_classes), (1 - confidence) / (n_classes - 1))
    out[np.arange(len(correct)), np.where(correct, 0, 1)] = confidence
    return out


def _folds(members: list[np.ndarray], n_folds: int = 2) -> list[Fold]:
    """Split every member's rows into `n_folds` folds (true class 0 everywhere)."""
    rows = np.array_split(np.arange(len(members[0])), n_folds)
    return [Fold(np.stack([m[r] for m in members]), np.zeros(len(r), dtype=int)) for r in rows]


def _pool() -> list[np.ndarray]:
    # a: right on 0..59 of 80; b: right on 20..79; together (averaged) right wherever one is sure
    # and the other is not; c: right nowhere useful.
    idx = np.arange(80)
    a = _proba(idx < 60, 0.9)
    b = _proba(idx >= 20, 0.7)
    c = _proba(idx < 10, 0.6)
    return [a, b, c]


def _objective(folds: list[Fold], members: list[int]) -> float:
    """Minus the mean per-fold log loss of the members' average, by scikit-learn (independent)."""
    return -float(np.mean([log_loss(f.y, f.proba[members].mean(axis=0), labels=[0, 1, 2]) for f in folds]))


def test_picks_the_best_member_then_what_adds_and_stops():
    a, b, c = _pool()
    folds = _folds([a, b, c])
    picked = select_members(folds, [1.0, 1.0, 1.0], lam=0.0)
    best_alone = max(range(3), key=lambda m: _objective(folds, [m]))
    assert picked.members[0] == best_alone == 1          # b: right less often than a, but less sure when wrong
    assert picked.members == (1, 0)                      # a adds; c would only hurt
    assert _objective(folds, [1, 0]) > _objective(folds, [1])
    assert _objective(folds, [1, 0, 2]) < _objective(folds, [1, 0])
    assert picked.weights == (0.5, 0.5)


def test_selection_is_deterministic_and_ties_go_to_the_cheaper_then_earlier_member():
    a, b, c = _pool()
    folds = _folds([a, b, c])
    assert select_members(folds, [1, 1, 1], lam=0.0) == select_members(folds, [1, 1, 1], lam=0.0)
    twins = _folds([b, b.copy(), a])
    assert select_members(twins, [1.0, 1.0, 1.0], lam=0.0).members[0] == 0      # equal: the earlier
    assert select_members(twins, [2.0, 1.0, 1.0], lam=0.0).members[0] == 1      # equal but cheaper


def test_a_duplicate_member_adds_nothing_and_is_not_chosen():
    a, b, _ = _pool()
    for lam in (0.0, 0.005):
        picked = select_members(_folds([b, a, b.copy()]), [1.0, 1.0, 1.0], lam=lam)
        assert picked.members == (0, 1)
    # Alone with its copy, the vote is one member.
    assert select_members(_folds([a, a.copy()]), [1.0, 1.0], lam=0.0).members == (0,)


def test_a_member_is_kept_exactly_when_its_gain_pays_its_price():
    a, b, _ = _pool()
    folds = _folds([b, a])
    gain = _objective(folds, [0, 1]) - _objective(folds, [0])      # what adding a gains, in nats
    assert gain > 0.1
    lam = 0.01
    assert select_members(folds, [1.0, 0.9 * gain / lam], lam=lam).members == (0, 1)
    assert select_members(folds, [1.0, 1.1 * gain / lam], lam=lam).members == (0,)    # only adds cost now
    # Pricing changes which single member starts, too: the cheaper one when the better costs more.
    alone = _objective(folds, [0]) - _objective(folds, [1])
    assert select_members(folds, [1.0 + 2 * alone / lam, 1.0], lam=lam, max_members=1).members == (1,)


def test_with_replacement_weights_count_the_additions():
    a, b, c = _pool()
    picked = select_members(_folds([a, b, c]), [1.0, 1.0, 1.0], lam=0.0, replace=True)
    assert sum(picked.weights) == pytest.approx(1.0)
    assert picked.weights == tuple(picked.order.count(m) / len(picked.order) for m in picked.members)
    assert len(picked.order) >= len(picked.members)


def test_forced_order_covers_the_pool_and_respects_the_cap():
    a, b, c = _pool()
    folds = _folds([a, b, c])
    assert sorted(select_members(folds, [1, 1, 1], lam=0.0, stop=False).members) == [0, 1, 2]
    assert select_members(folds, [1, 1, 1], lam=0.0, stop=False, max_members=2).members == \
        select_members(folds, [1, 1, 1], lam=0.0, stop=False).members[:2]
    assert len(select_members(folds, [1, 1, 1], lam=0.0, max_members=1).members) == 1


def test_accuracy_objective_and_backward_elimination():
    a, b, c = _pool()
    folds = _folds([a, b, c])
    assert select_members(folds, [1, 1, 1], objective="accuracy", lam=0.0).members[0] == 0
    kept = eliminate_members(folds, [1.0, 1.0, 1.0], lam=0.0)
    assert 2 not in kept.members and len(kept.members) >= 1
    assert isinstance(kept, Picked)


def test_bad_input_is_refused():
    a, b, _ = _pool()
    with pytest.raises(ValueError, match="objective"):
        select_members(_folds([a, b]), [1, 1], objective="f1")
    with pytest.raises(ValueError, match="all 3 members"):
        select_members(_folds([a, b]), [1, 1, 1])
    with pytest.raises(ValueError, match="at least one"):
        select_members([], [1.0])
