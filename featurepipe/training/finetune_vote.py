"""Fine-tuning a run whose model is a vote across feature sets.

Fine-tuning trains one backbone, and a vote averages several (one head per feature set, see
nested.vote_of). So it starts from the member whose feature set scored best on its own, and the
"before" it must beat is the run's real model, the vote, scored on the same validation images:
a fine-tuned single backbone that only beats its own frozen head, not the vote, would make the
run worse, and is not kept.

The vote's probabilities come from the feature store (every member's features of every dataset
image were cached when the run was evaluated), so this costs no backbone pass. With a validation
split carved from the training images (no validation split in the data), every member is refit
without those images first, as fine-tuning does for its own head, so "before" is not optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from featurepipe.rundir.heads_io import load_head, load_head_meta, vote_member_dirs
from featurepipe.rundir.layout import HEAD_META, VOTE
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import FeaturepipeError, UsageError


@dataclass
class VoteMember:
    folder: Path
    meta: dict                      # the member's best_head.json
    estimator: object
    spec: BackboneSpec              # resolved

    @property
    def features(self) -> str:
        return str(self.meta.get("features") or self.spec.name)


@dataclass
class Vote:
    """The run's vote: its members and which one fine-tuning starts from."""
    meta: dict                      # the run's best_head.json (head "vote")
    members: list[VoteMember]
    start: int                      # index of the member fine-tuning trains
    weights: list[float]            # each member's share of the average (equal unless recorded)

    @property
    def started_from(self) -> VoteMember:
        return self.members[self.start]

    def note(self) -> str:
        m = self.started_from
        accuracy = self.meta["members"][self.start].get("cv_accuracy")
        scored = f", CV accuracy {accuracy:.3f} on its own" if isinstance(accuracy, (int, float)) else ""
        best = self.start == best_member(self.meta)
        which = "the best single one" if best else "the member chosen with --student"
        return (f"the run's model is a vote over {len(self.members)} feature sets; fine-tuning trains one backbone, "
                f"so it starts from {which} ({m.features}{scored}) and is kept only if it beats the "
                f"vote on the validation images")


def best_member(meta: dict) -> int:
    """The member that scored best alone (ties: the first); a run without the figures: the first."""
    accuracies = [m.get("cv_accuracy") for m in meta["members"]]
    return max(range(len(accuracies)),
               key=lambda i: (accuracies[i] if isinstance(accuracies[i], (int, float)) else -1.0, -i))


def open_vote(run_dir: Path, trust_run: bool = False) -> Optional[Vote]:
    """The run's vote, or None when its model is a single head."""
    meta = load_head_meta(run_dir)
    if meta.get("head") != VOTE:
        return None
    members = []
    for folder in vote_member_dirs(run_dir, meta, trust_run):
        estimator, member_meta = load_head(folder, trust_run)
        if member_meta.get("augment", "none") != "none":
            raise FeaturepipeError(f"{folder} was trained on augmented views; fine-tuning a vote needs members trained "
                                   f"on original images (re-run evaluate without --augment)")
        members.append(VoteMember(folder, member_meta, estimator, BackboneSpec.from_dict(member_meta["backbone"]).resolved()))
    return Vote(meta, members, best_member(meta), meta.weights(Path(run_dir) / HEAD_META))


def choose_student(vote: Vote, name: str) -> Vote:
    """The vote with fine-tuning starting from the member `name` (--student): a member's feature-set
    name (as the report lists them, e.g. efficientnet_lite0@224/squash) or a backbone name that only
    one member has (e.g. efficientnet_lite0)."""
    from dataclasses import replace

    exact = [i for i, m in enumerate(vote.members) if m.features == name]
    by_backbone = [i for i, m in enumerate(vote.members) if m.spec.name == name]
    found = exact or by_backbone
    listed = ", ".join(m.features for m in vote.members)
    if not found:
        raise UsageError(f"--student {name}: the vote has no such member; choose one of {listed} (or a backbone only "
                         f"one of them has)")
    if len(found) > 1:
        raise UsageError(f"--student {name}: {len(found)} members use that backbone; name one of them: "
                         f"{', '.join(vote.members[i].features for i in found)}")
    return replace(vote, start=found[0])


def member_features(member: VoteMember, root: Path, hashes: Sequence[str]) -> np.ndarray:
    """The member's cached features of the images `hashes` (content hashes), in that order."""
    from featurepipe.extraction.features import open_stores

    store = open_stores(member.spec, root).originals
    missing = store.missing(list(hashes))
    if missing:
        raise FeaturepipeError(f"{len(missing)} image(s) have no {member.features} features in the cache {root} "
                               f"(e.g. content {missing[0][:12]}); re-run `featurepipe evaluate` on the dataset first")
    return store.read(list(hashes))


def teacher_members(prep) -> list[VoteMember]:
    """Whose probabilities teach the student (training.distill): the vote's members, or for a run
    whose model is one head, that head. `prep` is finetune's _Prepared."""
    if prep.vote is not None:
        return list(prep.vote.members)
    return [VoteMember(prep.run_dir, prep.meta, prep.estimator, prep.spec)]


def vote_proba(vote: Vote, root: Path, hashes: Sequence[str], n_classes: int,
               refit_on: Optional[tuple[Sequence[str], np.ndarray]] = None, seed: int = 0) -> np.ndarray:
    """The vote's class probabilities for the images `hashes` (content hashes), averaged over members;
    with `refit_on` = (train hashes, train labels) every member is first refit on those images only."""
    from featurepipe.heads import make_head
    from featurepipe.deploy.predict import head_probabilities

    classes = [str(i) for i in range(n_classes)]
    parts = []
    for member in vote.members:
        estimator = member.estimator
        if refit_on is not None:
            train_hashes, labels = refit_on
            estimator = make_head(member.meta["head"], member.meta.get("params") or {}, seed).fit(
                member_features(member, root, train_hashes), np.asarray(labels, dtype=np.int64))
        parts.append(head_probabilities(estimator, member_features(member, root, hashes), classes))
    return np.average(parts, axis=0, weights=vote.weights)
