"""Which vote members are worth their predict cost, and which feature sets the default search should
extract (not a test).

    python benchmarks/vote_selection.py --data data/demo --data photos-animals --data photos-scenes \
        --data photos-produce --data photos-objects --data fmnist30 --cache-dir /tmp/select-cache \
        --scratch /tmp/select-data [--json out.json]

For each data set, `featurepipe run`'s default search (9 feature sets: EfficientNet-Lite0/1/2 x
squash, center_crop, letterbox; logreg, knn, ncm; 5 folds, seed 0) is cross-validated once (features
and CV fits reused from --cache-dir), and then, as bookkeeping over the same out-of-fold
probabilities, nested-CV accuracy and mean predict cost (Lite0 passes per image, evaluation/cost.py)
of:

  * vote9: today's vote of every set's best logreg (members' C chosen on the inner folds);
  * sel[objective, lambda, with/without replacement]: forward selection (evaluation/selection.py)
    on the inner folds of each outer fold;
  * pools: for every subset P of the 9 feature sets (what the search would extract), the vote of P's
    members, and the shipped selection within P; cost of the run = extraction cost of P (its pass
    cost per image), cost of predicting = the selected members'.

Prints one JSON object per data set, then tables: variants (mean and worst accuracy difference to
vote9, mean predict cost), the cheapest pools within 0.5 points of vote9 on every set, and a greedy
extraction order by mean gain per pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.accuracy import _data  # noqa: E402

VARIANTS = ([("log_loss", lam, r) for lam in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05) for r in (False, True)]
            + [("accuracy", lam, r) for lam in (0.0, 0.001, 0.0025, 0.005, 0.01) for r in (False, True)]
            + [("log_loss", lam, "backward") for lam in (0.0, 0.002, 0.005, 0.01, 0.02)]
            + [("accuracy", lam, "backward") for lam in (0.0, 0.0025, 0.01)])


def _search(data: Path, cache: Path) -> tuple:
    """The default search's CV results on `data` (captured from evaluate), its labels and pass costs."""
    import featurepipe.evaluation.evaluate as ev
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig, feature_set_name
    from featurepipe.evaluation.cost import pass_cost

    captured = {}
    real = ev.nested_cv

    def capture(results, y, classes, paths, *args, **kwargs):
        captured.update(results=results, y=y, classes=classes, paths=paths)
        return real(results, y, classes, paths, *args, **kwargs)

    ev.nested_cv = capture
    try:
        config = SearchConfig()
        with tempfile.TemporaryDirectory() as run_dir:
            ev.evaluate(scan(data, cache_dir=cache), config, cache, run_dir=Path(run_dir) / "run")
    finally:
        ev.nested_cv = real
    costs = {feature_set_name(s): pass_cost(s) for s in config.specs}
    return captured, costs


def _outer_data(results, y):
    """Per outer fold: the vote pool (each set's best logreg on the inner folds, in the sets' order),
    its inner-fold probabilities and its outer-fold probabilities."""
    from featurepipe.evaluation.nested import _member_folds, _score, candidates, select, vote_pool

    pool = candidates(results)
    plan = next(iter(results.values())).plan
    fold_rows = {f.fold: np.asarray(f.val_idx) for f in plan if f.repeat == 0}
    out = []
    for outer in sorted(fold_rows):
        inner = [j for j in sorted(fold_rows) if j != outer]
        ranked = select([(c, *_score(y, results, c, 0, outer, inner, fold_rows)) for c in pool])
        members = vote_pool(ranked, list(results))
        folds = _member_folds(results, members, y, [(0, (min(j, outer), max(j, outer)), fold_rows[j]) for j in inner])
        test = _member_folds(results, members, y, [(0, outer, None)])[0]
        out.append((members, folds, test))
    return out


def _score(outer, costs, pick) -> tuple[float, float]:
    """Nested accuracy (mean over outer folds) and mean predict cost of the procedure `pick`:
    (members, inner folds, member costs) -> (member indices, weights)."""
    accs, spent = [], []
    for members, folds, test in outer:
        member_costs = [costs[m.features] for m in members]
        chosen, weights = pick(members, folds, member_costs)
        proba = np.sum([w * test.proba[i] for i, w in zip(chosen, weights)], axis=0)
        accs.append(float(np.mean(proba.argmax(axis=1) == test.y)))
        spent.append(float(sum(member_costs[i] for i in chosen)))
    return float(np.mean(accs)), float(np.mean(spent))


def _selector(objective, lam, replace, allowed=None):
    from featurepipe.evaluation.selection import Fold, eliminate_members, select_members

    def pick(members, folds, member_costs):
        keep = [i for i, m in enumerate(members) if allowed is None or m.features in allowed]
        sub = [Fold(f.proba[keep], f.y) for f in folds]
        sub_costs = [member_costs[i] for i in keep]
        if replace == "backward":
            picked = eliminate_members(sub, sub_costs, objective=objective, lam=lam)
        else:
            picked = select_members(sub, sub_costs, objective=objective, lam=lam, replace=replace)
        return [keep[i] for i in picked.members], picked.weights
    return pick


def _first(k, lam):
    from featurepipe.evaluation.selection import select_members

    def pick(members, folds, member_costs):
        picked = select_members(folds, member_costs, lam=lam, max_members=k, stop=False)
        return list(picked.members), [1.0 / len(picked.members)] * len(picked.members)
    return pick


def _vote(allowed=None):
    def pick(members, folds, member_costs):
        keep = [i for i, m in enumerate(members) if allowed is None or m.features in allowed]
        return keep, [1.0 / len(keep)] * len(keep)
    return pick


def one(data: Path, cache: Path, shipped: tuple) -> dict:
    captured, costs = _search(data, cache)
    y = np.asarray(captured["y"])
    outer = _outer_data(captured["results"], y)
    names = list(costs)
    row = {"images": len(y), "classes": len(captured["classes"]), "costs": costs, "variants": {}, "pools": {}}
    row["variants"]["vote9"] = _score(outer, costs, _vote())
    for objective, lam, replace in VARIANTS:
        how = "backward" if replace == "backward" else ("with" if replace else "without")
        row["variants"][f"{objective} lam={lam} {how}"] = _score(outer, costs, _selector(objective, lam, replace))
    for k in range(1, len(names) + 1):   # the frontier: forward order forced on, first k members, equal vote
        row["variants"][f"first {k} (log_loss lam={shipped[1]} order)"] = _score(outer, costs, _first(k, shipped[1]))
    for size in range(1, len(names) + 1):
        for pool in itertools.combinations(names, size):
            allowed = set(pool)
            vote = _score(outer, costs, _vote(allowed))
            sel = _score(outer, costs, _selector(*shipped, allowed=allowed)) if size > 1 else vote
            row["pools"]["|".join(pool)] = {"run_cost": sum(costs[n] for n in pool), "vote": vote, "select": sel}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True,
                        help="a folder, fmnistN[:seed], demoN:seed or photos-SET[N][:seed] (see datasets.named)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="persistent: features and CV fits are reused")
    parser.add_argument("--scratch", type=Path, default=None, help="where named data sets are assembled")
    parser.add_argument("--objective", default="log_loss", help="the shipped rule, used within each pool")
    parser.add_argument("--lam", type=float, default=0.005)
    parser.add_argument("--replace", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write every number here too")
    args = parser.parse_args()
    shipped = (args.objective, args.lam, args.replace)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="featurepipe-select-") as tmp:
        scratch = args.scratch or Path(tmp)
        for name in args.data:
            rows[name] = one(_data(name, scratch), args.cache_dir, shipped)
            print(json.dumps({"data": name, "variants": rows[name]["variants"]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows))
    report(rows)


def report(rows: dict) -> None:
    sets = list(rows)
    first = rows[sets[0]]
    full = sum(first["costs"].values())
    print(f"\nvariants: nested accuracy per set, mean, worst difference to vote9 (points), mean predict cost "
          f"(Lite0 passes; all 9 = {full:.2f})")
    print("| procedure | " + " | ".join(sets) + " | mean | worst vs vote9 | predict cost |")
    print("|" + " --- |" * (len(sets) + 4))
    for variant in first["variants"]:
        accs = [rows[s]["variants"][variant][0] for s in sets]
        worst = min(100 * (rows[s]["variants"][variant][0] - rows[s]["variants"]["vote9"][0]) for s in sets)
        cost = np.mean([rows[s]["variants"][variant][1] for s in sets])
        print(f"| {variant} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {np.mean(accs):.3f} | {worst:+.1f} | {cost:.2f} |")
    print("\npools within 0.5 points of vote9 on every set, cheapest first (run cost = extraction passes per image)")
    print("| pool | run cost | share | procedure | mean acc | worst vs vote9 | predict cost |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    shown = 0
    for pool in sorted(first["pools"], key=lambda p: first["pools"][p]["run_cost"]):
        for procedure in ("vote", "select"):
            diffs = [100 * (rows[s]["pools"][pool][procedure][0] - rows[s]["variants"]["vote9"][0]) for s in sets]
            if min(diffs) >= -0.5 and shown < 25:
                shown += 1
                cost = first["pools"][pool]["run_cost"]
                print(f"| {pool} | {cost:.2f} | {cost / full:.0%} | {procedure} | "
                      f"{np.mean([rows[s]['pools'][pool][procedure][0] for s in sets]):.3f} | {min(diffs):+.1f} | "
                      f"{np.mean([rows[s]['pools'][pool][procedure][1] for s in sets]):.2f} |")
    print("\nleave one set out: the pool (run cost <= 40%, equal vote) best on the other sets by (worst, mean) "
          "difference to vote9, scored on the set left out")
    cheap = [p for p in first["pools"] if first["pools"][p]["run_cost"] <= 0.4 * full + 1e-9]

    def diff(s, pool):
        return 100 * (rows[s]["pools"][pool]["vote"][0] - rows[s]["variants"]["vote9"][0])
    for held in sets:
        others = [s for s in sets if s != held]
        pool = max(cheap, key=lambda p: (min(diff(s, p) for s in others), np.mean([diff(s, p) for s in others]),
                                         -first["pools"][p]["run_cost"]))
        print(f"  {held}: {pool} -> {diff(held, pool):+.1f} points on {held}")
    families = {
        "one resize per backbone (27 pools, 33%)": [p for p in cheap if len(p.split("|")) == 3
                                                    and len({n.split("/")[0] for n in p.split("|")}) == 3],
        "Lite0 + Lite1, one resize each (9 pools, 18%)": [p for p in cheap if len(p.split("|")) == 2 and
                                                          {n.split("/")[0] for n in p.split("|")} ==
                                                          {"efficientnet_lite0", "efficientnet_lite1"}],
        "one backbone, all 3 resizes (3 pools)": [p for p in first["pools"] if len(p.split("|")) == 3
                                                  and len({n.split("/")[0] for n in p.split("|")}) == 1],
    }
    for family, pools in families.items():
        worst = [min(diff(s, p) for s in sets) for p in pools]
        means = [np.mean([diff(s, p) for s in sets]) for p in pools]
        print(f"  {family}: mean difference {np.mean(means):+.2f} points (range {min(means):+.2f}..{max(means):+.2f}), "
              f"worst set {min(worst):+.1f}..{max(worst):+.1f}, median worst {np.median(worst):+.1f}")
    print("\ngreedy extraction order (vote of the sets so far): each step adds the set with the best mean "
          "accuracy gain per pass")
    chosen: list[str] = []
    names = list(first["costs"])
    while len(chosen) < len(names):
        def mean_acc(pool):
            key = "|".join(n for n in names if n in pool)
            return np.mean([rows[s]["pools"][key]["vote"][0] for s in sets])
        base = mean_acc(chosen) if chosen else 0.0
        best = max((n for n in names if n not in chosen),
                   key=lambda n: ((mean_acc(chosen + [n]) - base) / first["costs"][n], -first["costs"][n]))
        chosen.append(best)
        key = "|".join(n for n in names if n in chosen)
        worst = min(100 * (rows[s]["pools"][key]["vote"][0] - rows[s]["variants"]["vote9"][0]) for s in sets)
        cost = sum(first["costs"][n] for n in chosen)
        print(f"{len(chosen)}. + {best}: mean {mean_acc(chosen):.4f}, worst vs vote9 {worst:+.1f} points, "
              f"run cost {cost:.2f} ({cost / full:.0%})")


if __name__ == "__main__":
    main()
