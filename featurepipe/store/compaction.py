"""Merging a feature store's small shards into bounded ones, and rewriting it without dropped rows.

A writer compacts when it finishes with more than COMPACT_AT shards (featurepipe.store.featurestore);
`prune_store` and `gc_store` (featurepipe.store.gc) rewrite every shard keeping only some keys.
`store` is that FeatureStore.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from featurepipe.core.atomic import fsync_dir
from featurepipe.store.shards import shard_keys as keys_of, shard_len


def compact(store, keep: Optional[set[str]] = None) -> None:
    """Merge the shards that are not full into shards of shard_rows() rows (with `keep`: rewrite every
    shard, keeping only those keys); the caller holds the lock.

    Streaming: at most one input shard and one output shard in memory, so compacting a store of
    any size costs bounded memory, and full shards are left alone (no quadratic rewriting as a
    store grows). New shards are in place before old ones go: a kill leaves duplicates, not gaps.
    """
    target = store.shard_rows()
    shards = store._shard_paths()
    if keep is None:
        old = [p for p in shards if shard_len(p) < target]
        if len(old) < 2:
            return
        seen = set()
        for shard in shards:
            if shard not in old:
                seen.update(keys_of(shard).tolist())
    else:
        old, seen = shards, set()
    keys: list[str] = []
    buffer: Optional[np.ndarray] = None        # one output shard, filled in place
    for shard in old:
        shard_keys, features = store._read_shard(shard)
        mask = np.array([k not in seen and (keep is None or k in keep) for k in shard_keys], dtype=bool)
        seen.update(shard_keys.tolist())
        kept_keys, kept = shard_keys[mask].tolist(), features[mask]
        if buffer is None:
            buffer = np.empty((target, features.shape[1]), dtype=np.float32)
        start = 0
        while start < len(kept):
            take = min(target - len(keys), len(kept) - start)
            buffer[len(keys):len(keys) + take] = kept[start:start + take]
            keys.extend(kept_keys[start:start + take])
            start += take
            if len(keys) == target:
                store._write_shard(keys, buffer)
                keys = []
    if keys:
        store._write_shard(keys, buffer[:len(keys)])
    for shard in old:
        shard.unlink()
    fsync_dir(store.directory / "shards")
    store._index = None
