"""Checking a feature store against itself and repairing it: spec.json against its shards, every
shard against its checksum (`featurepipe cache verify [--repair]`), and rebuilding a damaged spec.json
from what the shards record. Rows are never rewritten here; a damaged shard is only ever dropped.
The functions taking `store` take the FeatureStore (featurepipe.store.featurestore) to check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from featurepipe.backbones.spec import hash_payload
from featurepipe.core.atomic import write_json
from featurepipe.core.errors import StoreCorruptError
from featurepipe.store.shards import SCHEMA_VERSION, fingerprint_from_shards, shard_dims


def parse_spec(path: Path) -> dict:
    """spec.json's content, or StoreCorruptError when it is not a spec (FileNotFoundError passes)."""
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreCorruptError(f"not JSON: {error}") from None
    if (not isinstance(spec, dict) or not isinstance(spec.get("fingerprint"), str)
            or not isinstance(spec.get("payload"), dict)
            or not (spec.get("feature_dim") is None or isinstance(spec.get("feature_dim"), int))):
        raise StoreCorruptError("not a featurepipe store spec (fingerprint, payload, feature_dim)")
    return spec


def payload_matches(fingerprint: str, payload: dict) -> bool:
    """Is `fingerprint` the hash of `payload`? (A views store also keeps its base's payload beside it.)"""
    own = {k: v for k, v in payload.items() if k != "base_payload"}
    return hash_payload(payload) == fingerprint or hash_payload(own) == fingerprint


def rebuild_spec(store, fingerprint: Optional[str], payload: Optional[dict], why: str) -> dict:
    """A spec from the caller's fingerprint or from the shards' own record; the rows stay."""
    directory = store.directory
    recorded = fingerprint_from_shards(directory)
    if fingerprint is None and recorded is not None:
        fingerprint, payload = recorded
    if fingerprint is None or payload is None or not payload_matches(fingerprint, payload):
        raise StoreCorruptError(
            f"{directory / 'spec.json'} is damaged ({why}) and its shards do not record which backbone "
            f"they hold; its rows stay untouched: run `featurepipe extract` with the same backbone options to "
            f"rebuild it, or delete {directory} to drop them") from None
    if not directory.name or not fingerprint.startswith(directory.name):
        raise StoreCorruptError(f"{directory} is not named after fingerprint {fingerprint[:16]}; "
                                f"delete it and run extract again")
    dims = shard_dims(directory)
    spec = {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint, "payload": payload,
            "feature_dim": dims.pop() if len(dims) == 1 else None}
    if recorded is not None and recorded[0] != fingerprint:
        raise StoreCorruptError(f"{directory}'s shards hold features of fingerprint {recorded[0][:16]}, "
                                f"not {fingerprint[:16]}; delete that folder and run extract again")
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    write_json(directory / "spec.json", spec)
    store.repaired.append(f"{directory / 'spec.json'} was damaged ({why}); rebuilt from the shards "
                          f"({spec['feature_dim']}-d features), no row was lost")
    return spec


def verify(store, repair: bool = False) -> list[str]:
    """Check spec.json against the shards and every shard against its digest; return the problems.
    With repair, damaged shards are removed, a wrong spec is rebuilt from the shards where they
    record their fingerprint, and remembered decode failures are forgotten (so they are retried)."""
    problems = spec_problems(store)
    damaged = []
    for shard in store._shard_paths():
        try:
            store._read_shard(shard)
        except StoreCorruptError as error:
            problems.append(str(error))
            damaged.append(shard)
    if repair:
        # All at once: a writer may compact on exit, and compaction must not meet a damaged shard.
        with store.writer(timeout=60):
            for shard in damaged:
                shard.unlink(missing_ok=True)
            if spec_problems(store):
                recorded = fingerprint_from_shards(store.directory)
                if recorded is not None:
                    rebuild_spec(store, *recorded, "it disagreed with its shards")
                    spec = parse_spec(store.directory / "spec.json")
                    store.fingerprint, store.payload = spec["fingerprint"], spec["payload"]
                    store.feature_dim = spec["feature_dim"]
                else:
                    problems.append(f"{store.directory / 'spec.json'} cannot be rebuilt: its shards do not "
                                    f"record their fingerprint; delete {store.directory} and run extract again")
            store.clear_failures()
    store._index = None
    return problems


def spec_problems(store) -> list[str]:
    """Ways spec.json disagrees with itself or with the shards (an edited fingerprint or dim)."""
    spec_path = store.directory / "spec.json"
    problems = []
    if not payload_matches(store.fingerprint, store.payload):
        problems.append(f"{spec_path}: the fingerprint is not the hash of the recorded payload (edited?)")
    if not store.fingerprint.startswith(store.directory.name):
        problems.append(f"{spec_path}: fingerprint {store.fingerprint[:16]} does not match the folder name "
                        f"{store.directory.name} (edited or moved?)")
    recorded = fingerprint_from_shards(store.directory)
    if recorded is not None and recorded[0] != store.fingerprint:
        problems.append(f"{spec_path}: fingerprint {store.fingerprint[:16]} differs from the one its shards "
                        f"record ({recorded[0][:16]})")
    dims = shard_dims(store.directory)
    if dims and dims != {store.feature_dim}:
        problems.append(f"{spec_path}: feature_dim {store.feature_dim} but the shards hold "
                        f"{', '.join(map(str, sorted(dims)))}-d features")
    return problems
