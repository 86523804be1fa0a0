"""CSV cells that a spreadsheet opens as text and that read back as written.

The CSVs users open (predictions, out-of-fold predictions, suspects, duplicates...) carry user text:
file paths and class names. Two things go wrong with such text:

- Formula injection: a cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is run as a
  formula by Excel, LibreOffice and Google Sheets (`=HYPERLINK(...)` phones home, `+cmd|...` runs a
  program). `safe_frame` prefixes such a text cell with `'` (the OWASP recipe), which the
  spreadsheet shows as the text itself. Numbers are never touched: only cells that hold a str.
  A cell that already starts with `'` and then a trigger gets one more `'`, so that `restored_frame`
  (strip one `'` where `'` + trigger or `''` starts a cell) gives back every value exactly, and
  featurepipe's own readers (report, inspect, --exclude / --relabel) match paths and labels after
  the round trip.
- Line breaks: pandas (Python's csv module, 3.11) quotes a cell holding `\\n` but not one holding a
  lone `\\r`, which then splits the row in two on reading. `write_options` says how to write a frame
  so that every line break inside a cell is quoted: CRLF line ends (RFC 4180's own), only for a frame
  that holds a `\\r`, so every other file stays byte for byte as before.
"""

from __future__ import annotations

import os

import pandas as pd

from featurepipe.core import atomic

# What a spreadsheet reads as the start of a formula (OWASP, "CSV Injection").
TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def neutralised(value):
    """`value` as a cell no spreadsheet runs: a str starting with a trigger (or with `'` + a trigger,
    so the round trip stays exact) gets a leading `'`; anything else is returned unchanged."""
    if isinstance(value, str) and (value.startswith(TRIGGERS) or _escaped(value)):
        return QUOTE + value
    return value


def restored(value):
    """The inverse of `neutralised`: the value as it was before it was written."""
    if isinstance(value, str) and _escaped(value):
        return value[1:]
    return value


def _escaped(value: str) -> bool:
    return value.startswith(QUOTE) and (value[1:].startswith(TRIGGERS)
                                        or (value[1:2] == QUOTE and _escaped(value[1:])))


def _text_columns(frame: pd.DataFrame) -> list:
    return [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])]


def safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` with every text cell `neutralised` (numeric columns as they are)."""
    columns = {c: frame[c].map(neutralised) for c in _text_columns(frame)
               if frame[c].map(lambda v: neutralised(v) is not v).any()}
    return frame.assign(**columns) if columns else frame


def restored_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` as read from a CSV written through `safe_frame`, with every text cell `restored`."""
    columns = {c: frame[c].map(restored) for c in _text_columns(frame)
               if frame[c].map(lambda v: restored(v) is not v).any()}
    return frame.assign(**columns) if columns else frame


def write_options(frame: pd.DataFrame) -> dict:
    """to_csv options that keep every row of `frame` one record: CRLF line ends when a text cell holds
    a `\\r` (then every cell with `\\r` or `\\n` is quoted), none otherwise."""
    for c in _text_columns(frame):
        if frame[c].map(lambda v: isinstance(v, str) and "\r" in v).any():
            return {"lineterminator": "\r\n"}
    return {}


def write(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    """`frame` as a CSV at `path` (atomically) whose cells are safe to open in a spreadsheet and whose
    rows stay rows: every CSV featurepipe writes with user text in it goes through here."""
    atomic.write_csv(path, safe_frame(frame), **write_options(frame))


def read(path: str | os.PathLike, **read_csv_options) -> pd.DataFrame:
    """A CSV written by `write`, read back with the values as they were (pandas.read_csv's options)."""
    return restored_frame(pd.read_csv(path, **read_csv_options))
