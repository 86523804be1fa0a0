"""The head registry: a name maps to a builder (params, seed) -> unfitted scikit-learn classifier,
its default parameters and search grid, what the search may do with it (class_weight, cost), how
a fitted one is saved, and which function converts it to Keras. `register_head` adds one.

Adding a head is one module plus one decorator beside its builder (see featurepipe.heads.neighbours):

    @register_head("knn", defaults={"n_neighbors": 5}, default_grid={"n_neighbors": [3, 9]},
                   description="...", final_step="CosineKNN",
                   to_keras="featurepipe.heads.to_keras:knn_to_keras")
    def _knn(params, seed):
        return ...

The builder receives the defaults overlaid with the caller's params (unknown names are refused
before it runs). Converters and Keras loaders are named "module:attribute" and imported when first
used, so this module, and every scikit-learn-only head, never imports TensorFlow.

A leaf: it imports nothing from featurepipe but core.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
from sklearn.model_selection import ParameterGrid
from sklearn.pipeline import Pipeline

from featurepipe.core.errors import FeaturepipeError, UsageError

SAVE_FORMATS = ("joblib", "keras")


@dataclass(frozen=True)
class HeadEntry:
    """One head: how to build it and everything the search, the run directory and the Keras
    conversion need to know about it. Only name, build, default_grid and description are positional."""

    name: str
    build: Callable[[dict, int], Any]   # (params over the defaults, seed) -> unfitted estimator
    default_grid: dict[str, list]       # what the search tries when the user gives no grid
    description: str
    defaults: dict[str, Any] = field(default_factory=dict, kw_only=True)   # every parameter the head takes
    # The search adds class_weight="balanced" to the grid of these heads when the classes are imbalanced.
    class_weight: bool = field(default=False, kw_only=True)
    # Too slow for the learning curve's ~65 fits (and so not in the default search either).
    expensive: bool = field(default=False, kw_only=True)
    # Searched by `featurepipe run` when --heads is not given (in registration order).
    default: bool = field(default=False, kw_only=True)
    # Heads that load TensorFlow run sequentially in the calling process: a joblib worker each
    # would import TensorFlow (seconds and hundreds of MB apiece) and fight over the same cores.
    in_process: bool = field(default=False, kw_only=True)
    # The class name of the fitted estimator's last step (a Pipeline's final step, or the estimator
    # itself): how a loaded head is matched to its entry.
    final_step: str = field(default="", kw_only=True)
    # "module:function" (fitted estimator, n_features, name) -> keras.Model with the same
    # predict_proba; None: this head cannot be fine-tuned or exported.
    to_keras: Optional[str] = field(default=None, kw_only=True)
    # How a run directory keeps the fitted head: "joblib" (a pickle), or "keras" (the estimator's
    # save_keras(path); `keras_loader`, "module:function" (path, classes) -> estimator, reads it back).
    save_format: str = field(default="joblib", kw_only=True)
    keras_loader: Optional[str] = field(default=None, kw_only=True)
    # Bump when what the head fits for given params changes (a default, a transform): cached CV fold
    # results and refit heads are keyed on it, since their params name only what the grid set.
    revision: int = field(default=1, kw_only=True)

    def __post_init__(self):
        if self.save_format not in SAVE_FORMATS:
            raise UsageError(f"head {self.name!r}: unknown save_format {self.save_format!r}; expected one of "
                             f"{', '.join(SAVE_FORMATS)}")
        if (self.save_format == "keras") != (self.keras_loader is not None):
            raise UsageError(f"head {self.name!r}: give keras_loader exactly when save_format is 'keras'")


HEADS: dict[str, HeadEntry] = {}


def register_head(entry: HeadEntry | str, *, replace: bool = False, **fields) -> Any:
    """Add a head to the registry (registering the same entry twice is a no-op; a different entry
    under a registered name is refused unless replace=True).

    `register_head(HeadEntry(...))` registers an entry and returns it. `@register_head(name, **fields)`
    decorates the builder: the entry is HeadEntry(name, build=<the function>, **fields) and the
    function is returned unchanged.

    Register at the import of the head's module: joblib workers look heads up by name in a fresh
    process, which knows the heads of featurepipe.heads and of whatever the task's module imports;
    a head registered elsewhere (a test, a notebook) must be evaluated with n_jobs=1 or in_process=True.
    """
    if isinstance(entry, str):
        def decorate(build: Callable[[dict, int], Any]) -> Callable[[dict, int], Any]:
            register_head(HeadEntry(name=entry, build=build, **fields), replace=replace)
            return build

        return decorate
    if fields:
        raise UsageError(f"register_head({entry.name!r}): give fields only with a name (the decorator form)")
    current = HEADS.get(entry.name)
    if current is not None and current is not entry and not replace:
        raise UsageError(f"a head named {entry.name!r} is already registered; pass replace=True to replace "
                         f"it, or choose another name")
    # A fitted estimator finds its entry (its Keras converter, its save format) by the class of its last
    # step, so two heads must not end in the same class.
    twin = next((e for e in HEADS.values() if e.name != entry.name and entry.final_step
                 and e.final_step == entry.final_step), None)
    if twin is not None:
        raise UsageError(f"head {entry.name!r} ends in {entry.final_step}, as head {twin.name!r} does; fitted "
                         f"estimators are told apart by that class, so give {entry.name!r} its own final class")
    HEADS[entry.name] = entry
    return entry


def unregister_head(name: str) -> Optional[HeadEntry]:
    """Remove `name` from the registry (tests, plugins); returns its entry, None if it was not there."""
    return HEADS.pop(name, None)


@contextlib.contextmanager
def registered_head(entry: HeadEntry) -> Iterator[HeadEntry]:
    """`entry` registered for the duration of a `with` block (tests): whatever was registered under
    its name before is put back afterwards."""
    previous = HEADS.get(entry.name)
    register_head(entry, replace=True)
    try:
        yield entry
    finally:
        if previous is None:
            unregister_head(entry.name)
        else:
            HEADS[entry.name] = previous


def head_entry(name: str) -> HeadEntry:
    try:
        return HEADS[name]
    except KeyError:
        raise UsageError(f"unknown head '{name}'; valid heads: {', '.join(HEADS)}") from None


def head_names() -> tuple[str, ...]:
    """Every registered head, in registration order."""
    return tuple(HEADS)


def default_heads() -> tuple[str, ...]:
    """The heads `featurepipe run` searches when --heads is not given (flagged default=True)."""
    return tuple(name for name, entry in HEADS.items() if entry.default)


def expensive_heads() -> tuple[str, ...]:
    """The heads too slow to refit many times (the learning curve keeps a cheap one instead)."""
    return tuple(name for name, entry in HEADS.items() if entry.expensive)


def resolve_params(name: str, params: Mapping | None) -> dict:
    """`params` over head `name`'s defaults; an unknown parameter is refused with the valid ones."""
    defaults = head_entry(name).defaults
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UsageError(
            f"unknown parameter(s) {', '.join(unknown)} for head '{name}'; "
            f"valid parameters: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **params}


def make_head(name: str, params: Mapping | None = None, seed: int = 0):
    """An unfitted estimator for head `name` with `params` over its defaults."""
    entry = head_entry(name)
    return entry.build(resolve_params(name, params), seed)


def param_grid(name: str, override: Mapping | None = None) -> list[dict]:
    """Expand the head's default grid, with `override` replacing or adding parameters.

    Scalars in `override` count as one-point lists. Every point is validated by building it.
    """
    grid = dict(head_entry(name).default_grid)
    for key, values in (override or {}).items():
        grid[key] = list(values) if isinstance(values, (list, tuple, np.ndarray)) else [values]
    points = [_plain(p) for p in ParameterGrid(grid)]
    for point in points:
        make_head(name, point, 0)
    return points


def _plain(params: Mapping) -> dict:
    # numpy scalars would make the params JSON (cache key, leaderboard) depend on how they were typed.
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in sorted(params.items())}


def revisions() -> dict[str, int]:
    """Every head's revision: part of each cached fit's key (an ensemble fits other heads, so one
    head's new revision invalidates them all; revisions change rarely)."""
    return {name: entry.revision for name, entry in sorted(HEADS.items())}


def _final_step(estimator):
    final = estimator
    while isinstance(final, Pipeline):
        steps = [step for _, step in final.steps if step is not None and step != "passthrough"]
        if not steps:
            return None
        final = steps[-1]
    return final


def entry_for_estimator(estimator) -> Optional[HeadEntry]:
    """The entry whose fitted estimators look like `estimator` (by its last step's class); None if
    no head makes such an estimator."""
    final = _final_step(estimator)
    if final is None:
        return None
    return next((e for e in HEADS.values() if e.final_step and type(final).__name__ == e.final_step), None)


def save_format(estimator) -> str:
    """How a run directory keeps `estimator`: its entry's save_format when the estimator is that
    head's own final step, else "joblib" (a pipeline or a vote around it pickles as a whole)."""
    entry = entry_for_estimator(estimator)
    if entry is None or _final_step(estimator) is not estimator:
        return "joblib"
    return entry.save_format


def resolve(target: str) -> Any:
    """The object a "module:attribute.path" string names, imported now."""
    module, _, attribute = target.partition(":")
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def keras_converter(entry: HeadEntry) -> Optional[Callable[[Any, int, str], Any]]:
    """The entry's converter to Keras (importing it, and so Keras); None when it has none."""
    return resolve(entry.to_keras) if entry.to_keras else None


def keras_file_entry(name: Optional[str]) -> HeadEntry:
    """The entry that reads a run's .keras head file: head `name`'s when it saves as keras, else the
    first registered head that does (only such a head writes one; a file swapped in under another
    head's name is then refused by that loader, with Keras's own reason)."""
    entry = HEADS.get(name or "")
    if entry is not None and entry.save_format == "keras":
        return entry
    entry = next((e for e in HEADS.values() if e.save_format == "keras"), None)
    if entry is None:
        raise FeaturepipeError(f"no registered head saves as a .keras file, so head '{name}' cannot be read from "
                               f"one; re-run `featurepipe evaluate` to write the run's head again")
    return entry


def keras_loader(entry: HeadEntry) -> Callable[[Any, Any], Any]:
    """(path, classes) -> fitted estimator, for an entry whose save_format is "keras" (imports it)."""
    return resolve(entry.keras_loader)
