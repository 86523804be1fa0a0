"""What `evaluate` and `run` search, as one frozen value: the feature sets, the heads and their
grids, the cross-validation scheme and how the model is chosen.

The CLI builds it once from its options and hands it to evaluation.evaluate (or pipeline.run), so
the stages take one argument instead of repeating seventeen. Ranges are checked when it is built,
with the option to fix named. `to_dict` is the search's part of config.json, key for key and value
for value as runs have always recorded it (old run directories are read back by these keys).

One source of defaults: `SearchConfig()` (= `SearchConfig.default()`) is exactly what `featurepipe
run DATA` searches, and `SearchConfig.quick()` what `featurepipe run DATA --quick` and `featurepipe
evaluate DATA` search. The CLI builds its config through these two functions, and the defaults they
fill in come from evaluation.search, which the CLI's option defaults and help text read too, so a
notebook and the command line cannot drift apart (tests/evaluation/test_api_defaults.py compares them field by
field).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import UsageError
from featurepipe.data.augment import AugmentSpec
from featurepipe.evaluation import search
from featurepipe.evaluation.nested import ENSEMBLE_SIZE
from featurepipe.evaluation.search import DEFAULT_HEADS
from featurepipe.heads import HEADS
from featurepipe.backbones.registry import get_backbone

# DEFAULT_HEADS (evaluation.search): what `run` and `evaluate` cross-validate by default (logreg,
# knn, ncm). SEARCH_HEADS is its older name, kept for callers that import it.
SEARCH_HEADS = DEFAULT_HEADS
# The options that shape the searched feature sets (BackboneSpec fields, as the CLI names them),
# accepted by SearchConfig.default besides the dataclass fields.
SPEC_OPTIONS = ("backbone", "resize", "image_size", "layer", "pooling", "weights")


def _default_specs() -> tuple[BackboneSpec, ...]:
    # Looked up through the module at call time (not bound at import), so the search's defaults
    # stay in evaluation.search alone.
    return tuple(search.search_specs())


def feature_set_name(spec: BackboneSpec) -> str:
    """How a searched feature set is named in leaderboards: backbone/resize, plus what else differs."""
    info = get_backbone(spec.name)
    extra = "".join([f"@{spec.image_size}" if spec.image_size != info.default_size else "",
                     f":{spec.layer}" if spec.layer else "", f":{spec.pooling}" if spec.pooling != "avg" else ""])
    return f"{spec.name}{extra}/{spec.resize}"


@dataclass(frozen=True)
class SearchConfig:
    # The feature sets compared: one BackboneSpec each; by default what `featurepipe run` searches
    # (evaluation.search.search_specs(): DEFAULT_POOL, one feature set per EfficientNet-Lite size).
    specs: tuple[BackboneSpec, ...] = field(default_factory=_default_specs)
    # The heads cross-validated on every feature set (featurepipe.heads.HEADS names).
    heads: tuple[str, ...] = DEFAULT_HEADS
    # The user's --grid: head -> {param: [values]} overriding that head's default grid; None: defaults.
    grids: Optional[dict] = None
    # CV folds; None: 5, or as many as the smallest class (or its groups) has when that is fewer.
    folds: Optional[int] = None
    # Repetitions of the k-fold split with different shuffles.
    repeats: int = 1
    # Seed of the fold split and of every head's fit.
    seed: int = 0
    # The augmented views cached per image (an AugmentSpec, or a bare count: default policy, seed 0).
    augment: AugmentSpec = AugmentSpec()
    # Score each validation image by the mean over it and its views ("views" rows).
    tta: bool = False
    # Score the whole selection by nested CV: the headline the leaderboard's best row cannot be.
    nested: bool = True
    # Also try a soft vote of the best N heads on the best feature set (0 or 1: off).
    ensemble: int = ENSEMBLE_SIZE
    # With several feature sets, the model is a vote of each set's best logreg (else: one row wins).
    vote: bool = True
    # Keep only the vote members forward selection adds for their gain net of predict cost
    # (evaluation.selection). Off: measured on the benchmark sets it saves ~80% of predict cost but
    # loses 0.8 points of nested accuracy on average, up to 3 on one set (benchmarks/README.md).
    select_members: bool = False
    # Widen the C sweep by a decade while its best value sits at an edge of the grid and wins there.
    widen: bool = True
    # Put near-duplicate images in one CV group so that no copy leaks across folds.
    dedup_groups: bool = True

    def __post_init__(self) -> None:
        # Normalised in place (frozen): callers may pass a list of specs or heads and a bare view count.
        object.__setattr__(self, "specs", tuple(self.specs))
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "augment", AugmentSpec.of(self.augment))
        if not self.specs:
            raise UsageError("--backbone names no backbone; give at least one (see `featurepipe backbones`)")
        if not self.heads:
            raise UsageError("no heads to evaluate")
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown:
            raise UsageError(f"unknown head(s) {', '.join(unknown)}; heads: {', '.join(HEADS)}")
        stray = sorted(set(self.grids or {}) - set(self.heads))
        if stray:
            raise UsageError(f"grids given for head(s) not being evaluated: {', '.join(stray)}")
        if self.folds is not None and self.folds < 2:
            raise UsageError(f"--folds must be at least 2, not {self.folds}")
        if self.seed < 0:
            raise UsageError(f"--seed must be 0 or more, not {self.seed}")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be at least 1, not {self.repeats}")
        if self.ensemble < 0:
            raise UsageError(f"--ensemble must be 0 (off) or more, not {self.ensemble}")
        if self.augment.count < 0:
            raise UsageError(f"--augment must be 0 or more, not {self.augment.count}")

    @classmethod
    def default(cls, *, quick: bool = False, backbone: Optional[str | Sequence[str]] = None,
                resize: Optional[str] = None, **options) -> "SearchConfig":
        """What `featurepipe run DATA` searches (quick=True: `run DATA --quick`, which `evaluate DATA`
        searches too), with the options given changed; the CLI builds its config here.

        `backbone`: a name, a comma-separated list or a sequence of names (the CLI's --backbone; None
        with resize None: evaluation.search.DEFAULT_POOL, one feature set per EfficientNet-Lite size;
        None with a resize: Lite0/1/2; quick: Lite1); `resize`: a policy or "auto" (None: every policy
        of the backbones given, quick: the backbone's own); `image_size`, `layer`, `pooling`, `weights`: as the CLI's options,
        for every searched feature set. Any other keyword is a field of SearchConfig (heads, grids,
        folds, repeats, seed, augment, tta, nested, ensemble, vote, select_members, widen, dedup_groups, or specs to
        give the feature sets outright); None for a field keeps its default."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names - set(SPEC_OPTIONS))
        if unknown:
            raise UsageError(f"unknown search option(s) {', '.join(unknown)}; options: "
                             f"{', '.join(sorted(names | {'quick', *SPEC_OPTIONS}))}")
        spec_options = {k: options.pop(k) for k in SPEC_OPTIONS if options.get(k) is not None}
        chosen = {k: v for k, v in options.items() if v is not None}
        if "specs" in chosen:
            if backbone is not None or resize is not None or spec_options:
                raise UsageError("give the feature sets either as specs=... or as backbone/resize/image_size/"
                                 "layer/pooling/weights, not both")
        else:
            if backbone is not None and not isinstance(backbone, str):
                backbone = ",".join(backbone)
            chosen["specs"] = tuple(search.search_specs(search.parse_backbones(backbone), resize, quick,
                                                        **spec_options))
        return cls(**chosen)

    @classmethod
    def quick(cls, **options) -> "SearchConfig":
        """What `featurepipe run DATA --quick` (and `featurepipe evaluate DATA`) searches: one backbone
        (EfficientNet-Lite1) at its default resize (center_crop), the default heads. Options as in `default`."""
        return cls.default(quick=True, **options)

    def to_dict(self, searched_grids: dict) -> dict:
        """config.json's keys for the search: the "search" block, the augmentation and the top-level
        heads/grids/folds/repeats/seed/tta. Called on the config as the search resolved it (its folds,
        whether nested CV ran, the stores' augmentation); `searched_grids`: the grids it ended with
        (class_weight added, C widened)."""
        return {
            "search": {"feature_sets": {feature_set_name(s): s.to_dict() for s in self.specs},
                       "heads": list(self.heads), "grids": searched_grids, "ensemble": self.ensemble,
                       "nested": self.nested, "widen": self.widen, "vote": self.vote,
                       "select_members": self.select_members},
            **self.augment.to_config(),
            "heads": list(self.heads), "grids": self.grids, "folds": self.folds, "repeats": self.repeats,
            "seed": self.seed, "tta": self.tta,
        }
