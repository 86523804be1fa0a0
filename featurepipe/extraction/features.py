"""A dataset's cached features: the stores a backbone spec (and augmentation) maps to, the features
read back from them as arrays (what evaluate and inspect work on), and exports for other tools.

Nothing here builds a model or extracts: `featurepipe.extraction.extract` fills the stores, this module reads them.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.core import atomic
from featurepipe.backbones.accel import check_precision
from featurepipe.backbones.fingerprint import backbone_fingerprint, views_fingerprint
from featurepipe.backbones.spec import BackboneSpec, hash_payload
from featurepipe.extraction.batches import view_key
from featurepipe.data.dataset import Dataset
from featurepipe.core.errors import FeaturepipeError
from featurepipe.data.augment import AugmentPolicy, AugmentSpec
from featurepipe.core.cachedirs import features_dir
from featurepipe.store.featurestore import FeatureStore


@dataclass
class FeatureStores:
    """The stores a spec (and augmentation) maps to, opened without building any model."""
    spec: BackboneSpec
    originals: FeatureStore
    views: Optional[FeatureStore]
    augment: int
    policy: Optional[AugmentPolicy]
    seed: int = 0                     # the views' seed (AugmentSpec.seed)

    def view_keys(self, content_hash: str) -> list[str]:
        return [view_key(content_hash, k) for k in range(self.augment)]

    @property
    def augment_spec(self) -> AugmentSpec:
        return AugmentSpec(self.augment, self.policy, self.seed)


def open_stores(spec: BackboneSpec, root: Path, augment: AugmentSpec | int = 0,
                precision: str = "float32") -> FeatureStores:
    """`augment`: an AugmentSpec, or a bare view count (default policy, seed 0)."""
    augment = AugmentSpec.of(augment)
    spec = spec.resolved()
    fingerprint, payload = _originals_fingerprint(spec, root, precision)
    originals = FeatureStore.open(features_dir(root), fingerprint, payload)
    views = None
    policy = augment.resolved_policy
    if augment.count > 0:
        views_fp, views_payload = views_fingerprint(fingerprint, policy.to_dict(), augment.seed)
        views = FeatureStore.open(features_dir(root), views_fp, {**views_payload, "base_payload": payload})
    return FeatureStores(spec, originals, views, augment.count if views else 0, policy if views else None,
                         augment.seed)


def _originals_fingerprint(spec: BackboneSpec, root: Path, precision: str) -> tuple[str, dict]:
    fingerprint, payload = backbone_fingerprint(spec, root)
    if check_precision(precision) != "float32":
        # Half-precision features differ by ~1e-3 relative: their own store, never mixed with float32 rows.
        payload = {**payload, "precision": precision}
        fingerprint = hash_payload(payload)
    return fingerprint, payload


def other_policy_stores(spec: BackboneSpec, root: Path, precision: str = "float32") -> list[FeatureStore]:
    """The existing originals stores of `spec` under the other resize policies (none is created).

    A square image is the same square of pixels under squash, center_crop and letterbox
    (featurepipe.data.images), so its features under one policy are its features under the others:
    extract copies them from here instead of running the base again."""
    return [FeatureStore.open(features_dir(root), fingerprint, payload)
            for fingerprint, payload in other_policy_fingerprints(spec, root, precision)
            if store_exists(root, fingerprint)]


def other_policy_fingerprints(spec: BackboneSpec, root: Path, precision: str = "float32") -> list[tuple[str, dict]]:
    """(fingerprint, payload) of `spec`'s originals under each other resize policy, in RESIZE_POLICIES order."""
    from dataclasses import replace

    from featurepipe.backbones.spec import RESIZE_POLICIES

    spec = spec.resolved()
    return [_originals_fingerprint(replace(spec, resize=policy), root, precision)
            for policy in RESIZE_POLICIES if policy != spec.resize]


def store_exists(root: Path, fingerprint: str) -> bool:
    """Whether the store of FINGERPRINT has been created under the cache ROOT (opening creates it)."""
    return (features_dir(root) / fingerprint[:16] / "spec.json").is_file()


@dataclass
class DatasetFeatures:
    frame: pd.DataFrame               # the dataset rows that have features, in dataset order
    X: np.ndarray                     # (n, d) original-image features
    views: Optional[np.ndarray]       # (n, K, d) augmented-view features, or None
    missing: list[str]                # paths without features (they failed to decode)
    stores: Optional[FeatureStores] = None   # where they came from (spec, fingerprints, augmentation)


def dataset_features(dataset: Dataset, stores: FeatureStores) -> DatasetFeatures:
    """Features of every dataset row whose image is in the stores (see open_stores)."""
    have = stores.originals.keys()
    present = dataset.frame["hash"].isin(have)
    frame = dataset.frame[present].reset_index(drop=True)
    X = stores.originals.read(frame["hash"].tolist())
    views = None
    if stores.views is not None and len(frame):
        keys = [k for h in frame["hash"] for k in stores.view_keys(h)]
        views = stores.views.read(keys).reshape(len(frame), stores.augment, -1)
    return DatasetFeatures(frame, X, views, dataset.frame.loc[~present, "path"].tolist(), stores)


def cached_features(dataset: Dataset, specs: Sequence[BackboneSpec], root: Path,
                    augment: AugmentSpec | int = 0) -> list[DatasetFeatures]:
    """One DatasetFeatures per spec, read from the stores as they are (extract fills them first)."""
    return [dataset_features(dataset, open_stores(spec, root, augment)) for spec in specs]


META_COLUMNS = ["path", "label", "split", "group", "hash"]
EXPORT_FORMATS = (".parquet", ".npz", ".csv")
EXPORT_CHUNK_ROWS = 1024         # 5 MB of 1,280-d features per chunk


@dataclass
class ExportedFeatures:
    path: Path
    rows: int
    feature_dim: int
    missing: list[str]                # dataset paths without features (they failed to decode)


def export_format(out: Path) -> str:
    """The export format `out`'s suffix names; fails before any work is done for an unknown one."""
    suffix = Path(out).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise FeaturepipeError(f"{out}: unknown export format {suffix or '(none)'}; use .parquet, .npz or .csv")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise FeaturepipeError("writing .parquet needs pyarrow: pip install 'featurepipe[parquet]', "
                                   "or export to .npz / .csv") from None
    return suffix


def export_dataset_features(dataset: Dataset, stores, out: Path,
                            chunk_rows: int = EXPORT_CHUNK_ROWS) -> ExportedFeatures:
    """Like export_features(dataset_features(...)), streamed: features are read from the store and
    written `chunk_rows` rows at a time, so memory is the metadata columns plus one chunk (and one
    store shard) whatever the number of images."""
    out = Path(out)
    export_format(out)
    # A bool per row looked up in the store's index (isin against a copy of 70,000 keys cost ~25 MB).
    present = pd.Series(stores.originals.has(dataset.frame["hash"]), index=dataset.frame.index)
    # No filtered copy of the table (nor a list of every key) when every image has features.
    frame = dataset.frame if present.all() else dataset.frame[present].reset_index(drop=True)
    dim = stores.originals.feature_dim or 0
    hashes = frame["hash"]
    chunks = (stores.originals.read(hashes.iloc[start:start + chunk_rows].tolist())
              for start in range(0, len(frame), chunk_rows))
    _write(frame[META_COLUMNS], dim, chunks, out, chunk_rows)
    return ExportedFeatures(out, len(frame), dim, dataset.frame.loc[~present, "path"].tolist())


def export_features(features: DatasetFeatures, out: Path) -> Path:
    """Write path, label, split, group, hash and the features as .parquet or .npz (a `features` (n, d)
    matrix / fixed-size-list column) or .csv (columns f0..f{d-1})."""
    out = Path(out)
    export_format(out)
    X = features.X
    chunks = (X[start:start + EXPORT_CHUNK_ROWS] for start in range(0, len(X), EXPORT_CHUNK_ROWS))
    _write(features.frame[META_COLUMNS].reset_index(drop=True), X.shape[1], chunks, out, EXPORT_CHUNK_ROWS)
    return out


def _write(meta: pd.DataFrame, dim: int, chunks: Iterator[np.ndarray], out: Path, chunk_rows: int) -> None:
    """Written through featurepipe.core.atomic: a killed export leaves no half file."""
    suffix = export_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out) as tmp:
        writer = {".npz": _write_npz, ".parquet": _write_parquet, ".csv": _write_csv}[suffix]
        written = writer(meta, dim, chunks, tmp, chunk_rows)
        if written != len(meta):   # pragma: no cover - guards the chunking arithmetic
            raise FeaturepipeError(f"export wrote {written} feature rows for {len(meta)} images")


def _feature_names(dim: int) -> list[str]:
    return [f"f{i}" for i in range(dim)]


NPZ_WRITE_ROWS = 256


def _write_npz(meta: pd.DataFrame, dim: int, chunks, path: Path, chunk_rows: int) -> int:
    # The same file np.savez_compressed writes (one .npy per array), every member streamed behind a
    # header that states the final shape (and string width) up front: no whole-column array is built.
    rows = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open("features.npy", "w", force_zip64=True) as member:
            _write_npy_header(member, np.dtype("<f4"), (len(meta), dim))
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype="<f4")
                # No bytes copy, and 256 rows per write: deflate returns what it compressed as one
                # bytes object (~5 MB for a whole chunk; random-looking floats hardly shrink).
                for start in range(0, len(chunk), NPZ_WRITE_ROWS):
                    member.write(memoryview(chunk[start:start + NPZ_WRITE_ROWS]).cast("B"))
                rows += len(chunk)
                # Freed before the next chunk is read: the loop variable would keep it alive meanwhile
                # (two chunks, +5 MB, whenever there is more than one).
                del chunk
        for column in meta.columns:
            # A fixed-width unicode array as wide as the column's longest value (found in a first pass).
            width = max((part.dtype.itemsize // 4 for part in _text_chunks(meta[column], chunk_rows)), default=1)
            with archive.open(f"{column}.npy", "w", force_zip64=True) as member:
                _write_npy_header(member, np.dtype(f"<U{width}"), (len(meta),))
                for part in _text_chunks(meta[column], chunk_rows):
                    member.write(part.astype(f"<U{width}").tobytes())
    return rows


def _text_chunks(values: pd.Series, chunk_rows: int) -> Iterator[np.ndarray]:
    for start in range(0, len(values), chunk_rows):
        yield _text_array(values.iloc[start:start + chunk_rows])


def _text_array(values: pd.Series) -> np.ndarray:
    # Missing values (a manifest row without a group) as "": with pandas 3, a column holding any
    # missing value came out of .astype(str).to_numpy(dtype=str) cut to ONE character per value.
    return np.array(["" if pd.isna(v) else str(v) for v in values], dtype=str)


def _write_npy_header(member, dtype: np.dtype, shape: tuple) -> None:
    np.lib.format.write_array_header_1_0(member, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})


def _write_parquet(meta: pd.DataFrame, dim: int, chunks, path: Path, chunk_rows: int) -> int:
    """The metadata columns as strings and the features as one `features` column of fixed-size float32
    lists (np.stack(pd.read_parquet(f)["features"]) gives the (n, d) matrix; pyarrow: .flatten()).
    One column per feature (f0..f1279) made pyarrow's writer keep ~0.9 KB of metadata per row group
    and column until it closes -- ~17 MB at 70,000 rows in 4,096-row groups, plus the 21 MB those
    groups buffered -- so the file's memory grew 1.35x from 1,000 to 70,000 images. With one list
    column a row group costs a few hundred bytes of metadata, so each chunk is its own row group
    (~5 MB of 1,280-d features) and memory stays flat. The same layout as the .npz export (a `features`
    matrix beside the metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string()) for c in META_COLUMNS] + [("features", pa.list_(pa.float32(), dim))],
                       metadata={"featurepipe.extraction.features": f"float32 x {dim} per row"})
    rows = 0
    # Dictionary pages only for the strings: on float features they only cost memory and file size
    # (the writer fills a 1 MB dictionary page per row group before giving up on it).
    with pq.ParquetWriter(path, schema, use_dictionary=list(META_COLUMNS)) as writer:
        for chunk in chunks:
            part = meta.iloc[rows:rows + len(chunk)]
            arrays = [pa.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                                for v in part[c]], type=pa.string()) for c in META_COLUMNS]
            values = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values), dim))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=len(chunk))
            rows += len(chunk)
            del chunk, values, arrays
    return rows


def _write_csv(meta: pd.DataFrame, dim: int, chunks, path: Path, chunk_rows: int) -> int:
    rows = 0
    with open(path, "w", newline="") as handle:
        pd.DataFrame(columns=META_COLUMNS + _feature_names(dim)).to_csv(handle, index=False)
        for chunk in chunks:
            part = meta.iloc[rows:rows + len(chunk)].reset_index(drop=True)
            table = pd.concat([part, pd.DataFrame(chunk, columns=_feature_names(dim))], axis=1)
            table.to_csv(handle, index=False, header=False)
            rows += len(chunk)
            del chunk
    return rows
