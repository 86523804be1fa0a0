"""The typer options several commands share, declared once so that their names, defaults and help
text stay the same everywhere they appear; and the range checks every numeric option has.

Every numeric option of every command is checked when the command line is parsed, so a nonsense
value is refused at once (exit 2, the option and its valid range named) instead of running for a
while and crashing or silently meaning something else: integers by typer's min/max, floats by
`number_in` (click's FloatRange lets NaN through, since every comparison with NaN is false).
--image-size is checked by BackboneSpec (its minimum depends on the backbone), as early.
"""

import math
from typing import Callable, Optional

import typer

# The search's defaults, from the one module SearchConfig takes them from too (light: no scikit-learn).
from featurepipe.backbones.spec import RESIZE_POLICIES
from featurepipe.evaluation.search import (AUTO, DEFAULT_BACKBONES, DEFAULT_BUDGET, DEFAULT_HEADS, DEFAULT_POOL,
                                           QUICK_BACKBONE)

# numpy's and scikit-learn's seeds are unsigned 32-bit numbers: anything else was a traceback.
SEED_MAX = 2**32 - 1


def number_in(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
              high_open: bool = False) -> Callable:
    """A typer callback: the value must be a finite number in the range (open ends where asked)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        inside = (math.isfinite(value)
                  and (low is None or (value > low if low_open else value >= low))
                  and (high is None or (value < high if high_open else value <= high)))
        if not inside:
            raise typer.BadParameter(f"must be {wanted}, not {value}", param=param)
        return value

    return check


def _jobs(param: typer.CallbackParam, value: int) -> int:
    # joblib's n_jobs: N workers, or -1 all cores, -2 all but one...; 0 means nothing and is refused there.
    if value == 0:
        raise typer.BadParameter("must be a number of parallel fits (1 or more) or -1 for every core "
                                 "(-2 all but one, ...), not 0", param=param)
    return value


CacheDir = typer.Option(None, "--cache-dir", help="Cache root: features, runs, remembered hashes (default: "
                        "$FEATUREPIPE_CACHE or ./cache).")
Backbone = typer.Option(QUICK_BACKBONE, "--backbone", "-b", help="Backbone name; see `featurepipe backbones`.")
ImageSize = typer.Option(None, "--image-size", help="Input size in pixels (default: the backbone's).")
Layer = typer.Option(None, "--layer", help="Take features from this named layer (e.g. block4_pool, fc2).")
Pooling = typer.Option("avg", "--pooling", help="avg | max | flatten, for spatial layers.")
Weights = typer.Option("imagenet", "--weights", help="imagenet | random | PATH to a weights file.")
Resize = typer.Option(None, "--resize", help="squash | center_crop | letterbox (default: the backbone's).")
SearchBackbone = typer.Option(None, "--backbone", "-b",
                              help=f"Backbone, or a comma-separated list to search (run default: "
                                   f"{', '.join(f'{b}/{r}' for b, r in DEFAULT_POOL)}; with --resize or a list: "
                                   f"each backbone x the policies; --resize auto alone: "
                                   f"{','.join(DEFAULT_BACKBONES)} x all three; run --quick and evaluate default: "
                                   f"{QUICK_BACKBONE}).")
SearchResize = typer.Option(None, "--resize", help=f"{' | '.join((*RESIZE_POLICIES, AUTO))} ({AUTO}: all three, "
                                                   f"compared by CV; run default: the pool's own, see --backbone; "
                                                   f"run --quick and evaluate default: the backbone's own).")
Nested = typer.Option(True, "--nested/--no-nested", help="Score the whole selection by nested CV (the headline).")
Ensemble = typer.Option(3, "--ensemble", min=0, help="With one feature set (or --no-vote): also try a soft vote of the best N "
                        "heads on the best feature set (0: off).")
Vote = typer.Option(True, "--vote/--no-vote", help="With several feature sets, the model is a vote: each set's best "
                    "logreg, probabilities averaged (measured +1 to +5 points over picking one row). --no-vote picks "
                    "one configuration instead.")
SelectMembers = typer.Option(False, "--select-members",
                             help="With a vote: keep only the feature sets forward selection adds for their CV gain net "
                                  "of predict cost (fewer backbone passes per image; measured 0.8 points less "
                                  "accurate on average on small sets, so off by default).")
Augment = typer.Option(0, "--augment", min=0, help="Also cache K augmented views per image.")
AsJson = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout.")
Heads = typer.Option(",".join(DEFAULT_HEADS), "--heads", help="Comma-separated head names (default: what `run` searches; "
                                                         "linear_svm and dense on request: 3x and ~20x a logreg fit).")
Folds = typer.Option(5, "--folds", min=2, help="Cross-validation folds.")
AutoFolds = typer.Option(None, "--folds", min=2, help="Cross-validation folds (default: 5, or as many as the smallest "
                                               "class has images when that is 2-4, said in the summary).")
Repeats = typer.Option(1, "--repeats", min=1, help="Repeat the k-fold CV with N different shuffles and average "
                       "(steadier numbers, N times the fits).")
Seed = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the fold shuffles and of every fit that draws "
                    "random numbers: the same seed gives the same folds and the same leaderboard.")
Grid = typer.Option(None, "--grid", help="JSON or a .toml/.json file: {head: {param: [values]}}.")
Tta = typer.Option(False, "--tta", help="Average each validation image over its augmented views.")
Jobs = typer.Option(-1, "--jobs", callback=_jobs, help="Parallel fits (joblib n_jobs: -1 every core).")
RunDir = typer.Option(None, "--run-dir", help="Folder for the run (model, leaderboard, report); default: "
                      "CACHE/runs/<time>-<data name>.")
# Scaling out (featurepipe.extraction.executors.choose); both need `pip install 'featurepipe[dask]'`.
Scheduler = typer.Option(None, "--scheduler", help="Run on this Dask scheduler, e.g. tcp://host:8786 "
                         "(default: $FEATUREPIPE_SCHEDULER; none: this process).")
Workers = typer.Option(None, "--workers", min=1, help="Start a Dask LocalCluster of N worker processes for this run.")
Overwrite = typer.Option(False, "--overwrite", help="Write into an existing folder that is not a featurepipe run.")
Trust = typer.Option(False, "--trust", help="Load a run whose head this user's key did not sign (copied from "
                     "elsewhere). Loading a head can run code it contains: only for runs you trust.")

# Near-duplicate groups and inspect's fixes, fed back into evaluate and run.
NoDedupGroups = typer.Option(False, "--no-dedup-groups",
                             help="Do not put near-duplicate images in one CV group (see `featurepipe inspect`).")
Exclude = typer.Option(None, "--exclude", help="CSV with a path column: leave these images out (e.g. inspect's suspects.csv).")
Relabel = typer.Option(None, "--relabel", help="CSV with columns path,label (or inspect's 'suggested'): new labels.")
GroupsFrom = typer.Option(None, "--groups-from", help="CSV with columns path,group.")
Groups = typer.Option(None, "--groups", help="Regex on file names; its first group is the group id.")
# Commands that read a run (predict, export).
RunCacheDir = typer.Option(None, "--cache-dir", help="Cache root (default: the one the run was made with).")
ModelChoice = typer.Option("auto", "--model", help="auto (the fine-tuned model if the run has one) | finetuned | head.")
AugmentSeed = typer.Option(0, "--augment-seed", min=0, max=SEED_MAX, help="Seed of the augmented views (with "
                           "--augment): another seed draws other views, cached separately.")
LockTimeout = typer.Option(600.0, "--lock-timeout", callback=number_in(0), metavar="SECONDS",
                           help="How long to wait, in seconds, for another featurepipe process writing the same "
                                "feature store before giving up (0: give up at once).")

# `predict` and `inspect` once named "how many to list" differently (--top-k, --top): both take --top
# now, and --top-k stays as a hidden alias so that existing scripts keep working.
def top_alias(minimum: int):
    return typer.Option(None, "--top-k", min=minimum, hidden=True, help="Old name of --top (still accepted).")


def top_value(top: int, alias: Optional[int]) -> int:
    """--top, or the value given under its old name --top-k."""
    return top if alias is None else alias

# run's time budget (evaluation.stages): checked here like every number, and again by pipeline.run.
Budget = typer.Option(DEFAULT_BUDGET, "--budget", callback=number_in(0),
                      help="Seconds for the search (extraction + evaluation): feature sets whose estimated time "
                           "would not fit are left out, and the result says which. Cached feature sets always fit. "
                           "0: no limit.")
FinetuneFolds = typer.Option(None, "--finetune-folds", min=0, metavar="K",
                             help="Score the fine-tuned student against the frozen model (the vote) on K outer folds "
                                  "of the training images, every image once by models that never saw it, and keep "
                                  "whichever wins over all of them; costs K more fine-tunings. 0: the 20% held out "
                                  "decides. Default: 5 on a GPU, 0 on a CPU.")
TrainAugment = typer.Option(None, "--train-augment", metavar="POLICY",
                            help="How fine-tuning augments its training images each epoch: classic (Keras's "
                                 "ImageDataGenerator recipe: rotation 40, shifts and zoom 0.2, flips) | light (flips, shifts "
                                 "and zoom 0.1, no rotation) | flip (mirror only: measured best) | none. Default: flip.")
Wise = typer.Option(None, "--wise", metavar="A", callback=number_in(0, 1),
                    help="Save the student as A x its fine-tuned weights + (1 - A) x the linear probe it started "
                         "from (a weight-space ensemble, WiSE-FT: still one network). 1: the fine-tuned weights. "
                         "Default: 0.5.")
Mixup = typer.Option(None, "--mixup", metavar="A", callback=number_in(0),
                     help="Blend each training image with another of its batch, pixels and labels alike, in a "
                          "proportion drawn from Beta(A, A) (mixup): the linear probe fine-tuning starts from fits "
                          "its training images, blended ones keep a loss to learn from. 0: off. Default: 0.4.")
StudentMember = typer.Option(None, "--student", metavar="MEMBER",
                             help="Which member of the vote fine-tuning trains: a backbone only one member has (e.g. "
                                  "efficientnet_lite0, the cheapest to predict with) or a member's feature-set name. "
                                  "Default: the member that scored best alone.")
