"""Cache keys: one sha256 over the values a cached result depends on.

Arrays count by dtype, shape and bytes (object arrays, e.g. group names, by the repr of each value,
since their bytes are pointers); data frames by their JSON; anything else by its JSON (sorted keys,
str() for what JSON cannot hold). Each value is tagged and closed, so two different sequences of
values never feed the hash the same bytes.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd


def digest(*values) -> str:
    h = hashlib.sha256()
    for value in values:
        if isinstance(value, np.ndarray) and value.dtype != object:
            h.update(f"array:{value.dtype.str}:{value.shape}:".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, np.ndarray):
            h.update(b"objects:" + json.dumps([repr(v) for v in value.tolist()]).encode())
        elif isinstance(value, pd.DataFrame):
            h.update(b"frame:" + value.to_json(orient="split", default_handler=str).encode())
        else:
            h.update(b"json:" + json.dumps(value, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()
