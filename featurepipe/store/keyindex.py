"""A feature store's index: which shard and row hold each key, at ~70 bytes a key.

The index was a dict of key -> (shard name, row): ~200 bytes of Python objects per key, ~13 MB at
70,000 images, built by every command that reads a store (`features export` among them, whose
memory must stay flat from 1,000 to 70,000 images). Here the keys are one sorted array
of fixed-width UTF-8 bytes beside two int32 arrays, and lookups are binary searches run on a chunk
of keys at a time.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, Sequence

import numpy as np

from featurepipe.core.columns import encoded, joined

LOOKUP_CHUNK = 4096


class KeyIndex:
    def __init__(self, keys: np.ndarray, shards: np.ndarray, rows: np.ndarray, names: Sequence[str]):
        self._keys = keys          # sorted, unique, dtype S<width>
        self._shards = shards      # int32: position in `names`
        self._rows = rows          # int32: row in that shard
        self.names = list(names)   # shard file names

    @classmethod
    def build(cls, shards: Iterable[tuple[str, Sequence]]) -> "KeyIndex":
        """From (shard name, its keys as str or UTF-8 bytes) in shard order, taken one shard at a time
        (only one shard's keys are ever Python objects). A key in several shards (a killed compaction
        leaves duplicates, never gaps) is found in the last, as with a dict."""
        names, parts = [], []
        for name, keys in shards:
            names.append(name)
            parts.append(encoded(keys))
        sizes = [len(p) for p in parts]
        if not sum(sizes):
            return cls(np.empty(0, dtype="S1"), np.empty(0, np.int32), np.empty(0, np.int32), names)
        keys = joined(parts)
        owner = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        rows = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes])
        order = np.argsort(keys, kind="stable")
        keys.sort()                       # in place: the same array as keys[order], without a second copy
        last = np.append(keys[1:] != keys[:-1], True)     # the last of each run of equal keys
        if not last.all():                                 # no third copy of the keys when all are unique
            keys, order = keys[last], order[last]
        return cls(keys, owner[order], rows[order], names)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._keys), LOOKUP_CHUNK):
            yield from (k.decode("utf-8") for k in self._keys[start:start + LOOKUP_CHUNK].tolist())

    def _positions(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(position of each key in the sorted keys, whether it is there)."""
        encoded = [k.encode("utf-8") for k in keys]
        width = self._keys.dtype.itemsize
        # A key longer than every indexed one cannot be there (and would be cut to `width` bytes).
        fits = np.fromiter((len(k) <= width for k in encoded), dtype=bool, count=len(encoded))
        query = np.array([k if ok else b"" for k, ok in zip(encoded, fits)], dtype=self._keys.dtype)
        at = np.searchsorted(self._keys, query)
        found = fits & (at < len(self._keys))
        found[found] = self._keys[at[found]] == query[found]
        return at, found

    def contains(self, keys: Iterable[str]) -> np.ndarray:
        """One bool per key, in order."""
        keys = iter(keys)
        parts = []
        while chunk := list(islice(keys, LOOKUP_CHUNK)):
            parts.append(self._positions(chunk)[1])
        return np.concatenate(parts) if parts else np.empty(0, dtype=bool)

    def locate(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard position in `names`, row) of each key; KeyError naming how many are absent."""
        at, found = self._positions(keys)
        if not found.all():
            absent = [k for k, ok in zip(keys, found) if not ok]
            raise KeyError(absent)
        return self._shards[at], self._rows[at]

