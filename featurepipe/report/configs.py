"""How the report names a configuration (feature set, head, parameters, augmentation): one key per
configuration whatever spelling its parameters were written in, and the label a reader sees."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd


def canonical_params(params: Any) -> str:
    """One spelling per parameter set, whether it comes as a dict or as a JSON string."""
    if isinstance(params, str):
        text = params.strip()
        if not text:
            return "{}"
        try:
            params = json.loads(text)
        except ValueError:
            return text
    if params is None:
        params = {}
    return json.dumps(params, sort_keys=True)


def config_key(head: str, params: Any, augment: str) -> tuple[str, str, str]:
    """(head, canonical params, augment): equal for the same configuration in every file of a run."""
    return str(head), canonical_params(params), str(augment or "none")


def with_key(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of a leaderboard, folds or OOF table with each row's configuration key in a `_key` column."""
    frame = frame.copy()
    if "params" not in frame.columns:
        frame["params"] = "{}"
    if "augment" not in frame.columns:
        frame["augment"] = "none"
    heads = frame["head"].astype(str)
    if "features" in frame.columns:
        # A searched run compares the same head on several feature sets: the feature set is part of the name.
        heads = frame["features"].fillna("").astype(str).str.cat(heads, sep=" ").str.strip()
    frame["_key"] = [config_key(h, p, a) for h, p, a in zip(heads, frame["params"], frame["augment"])]
    return frame


def params_text(params: Any) -> str:
    """Parameters as a reader writes them (key=value, ...), an ensemble as its members."""
    canonical = canonical_params(params)
    try:
        parsed = json.loads(canonical)
    except ValueError:
        return canonical
    if isinstance(parsed, dict) and isinstance(parsed.get("members"), list):
        # An ensemble: its members as head(key=value), not its JSON.
        # A vote across feature sets names each member's feature set too.
        return " + ".join(f"{(str(m['features']) + ' ') if m.get('features') else ''}{m.get('head')}"
                          f"({params_text(m.get('params') or {})})" for m in parsed["members"]
                          if isinstance(m, dict))
    if isinstance(parsed, dict):
        return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in parsed.items())
    return canonical


def config_label(key: tuple[str, str, str]) -> str:
    """head (params) +augment, the name the report gives a configuration."""
    head, params, augment = key
    text = head
    params = params_text(params)
    if params:
        text += f" ({params})"
    if augment and augment != "none":
        text += f" +{augment}"
    return text
