"""JSON that strict parsers accept: no NaN or Infinity tokens, no numpy types."""

from __future__ import annotations


def json_ready(value):
    """`value` with every NaN / infinity as None and numpy scalars and arrays as plain Python:
    strict JSON has no NaN (a holdout split missing a class gives NaN metrics), and parsers reject it."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) and k is not None else k: json_ready(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
