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


def members(params: Any) -> list[dict]:
    """An ensemble's or a vote's members ({features, head, params}), [] for a single head."""
    try:
        parsed = json.loads(canonical_params(params))
    except ValueError:
        return []
    if isinstance(parsed, dict) and isinstance(parsed.get("members"), list):
        return [m for m in parsed["members"] if isinstance(m, dict)]
    return []


def member_label(member: dict) -> str:
    """One member as `feature set head (params)`."""
    text = f"{member['features']} " if member.get("features") else ""
    params = params_text(member.get("params") or {})
    return text + str(member.get("head")) + (f" ({params})" if params else "")


def short_label(key: tuple[str, str, str]) -> str:
    """The name the report gives a configuration in running text, tables and charts: a vote or an
    ensemble by its size ("a vote of 9 feature sets"), every other configuration as config_label. The
    members are listed once, in the Run section: the whole label of `run`'s vote is ~600 characters,
    and it was repeated 6+ times on the page."""
    found = members(key[1])
    if not found:
        return config_label(key)
    if any(m.get("features") for m in found):
        text = f"a vote of {len(found)} feature sets"
    else:
        text = f"{key[0]} of {len(found)} heads"
    return text + (f" +{key[2]}" if key[2] and key[2] != "none" else "")
