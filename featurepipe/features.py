"""Reading a dataset's cached features back as arrays, and exporting them for other tools."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from featurepipe.dataset import Dataset
from featurepipe.errors import FeaturepipeError


@dataclass
class DatasetFeatures:
    frame: pd.DataFrame               # the dataset rows that have features, in dataset order
    X: np.ndarray                     # (n, d) original-image features
    views: Optional[np.ndarray]       # (n, K, d) augmented-view features, or None
    missing: list[str]                # paths without features (they failed to decode)


def dataset_features(dataset: Dataset, stores) -> DatasetFeatures:
    """Features of every dataset row whose image is in the stores (see extract.open_stores)."""
    have = stores.originals.keys()
    present = dataset.frame["hash"].isin(have)
    frame = dataset.frame[present].reset_index(drop=True)
    X = stores.originals.read(frame["hash"].tolist())
    views = None
    if stores.views is not None and len(frame):
        keys = [k for h in frame["hash"] for k in stores.view_keys(h)]
        views = stores.views.read(keys).reshape(len(frame), stores.augment, -1)
    return DatasetFeatures(frame, X, views, dataset.frame.loc[~present, "path"].tolist())


def export_features(features: DatasetFeatures, out: Path) -> Path:
    """Write path, label, split, group and the feature columns f0..f{d-1} as .parquet, .npz or .csv."""
    out = Path(out)
    suffix = out.suffix.lower()
    meta = features.frame[["path", "label", "split", "group", "hash"]].reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        np.savez_compressed(out, features=features.X, **{c: meta[c].astype(str).to_numpy(dtype=str) for c in meta.columns})
        return out
    columns = pd.DataFrame(features.X, columns=[f"f{i}" for i in range(features.X.shape[1])])
    table = pd.concat([meta, columns], axis=1)
    if suffix == ".parquet":
        try:
            table.to_parquet(out, index=False)
        except ImportError:
            raise FeaturepipeError("writing .parquet needs pyarrow: pip install 'featurepipe[parquet]', "
                                   "or export to .npz / .csv") from None
    elif suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        raise FeaturepipeError(f"{out}: unknown export format {suffix or '(none)'}; use .parquet, .npz or .csv")
    return out
