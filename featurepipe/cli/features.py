"""`featurepipe features export`: the cached features as a table for other tools."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command, spec as make_spec
from featurepipe.cli.options import AsJson, Backbone, CacheDir, ImageSize, Layer, Pooling, Resize, Weights


def features_export(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    out: Path = typer.Option(..., "--out", help="The file to write; its suffix picks the format: .parquet | .npz | .csv."),
    backbone: str = Backbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = Resize,
    cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson,
) -> None:
    """Export path, label, split and the cached features (extracting whatever is missing first)."""
    from featurepipe.cli import render
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract as run_extract, open_stores
    from featurepipe.extraction.features import export_dataset_features, export_format
    from featurepipe.cli.memory import return_large_blocks
    from featurepipe.core.cachedirs import cache_root

    with Command(as_json) as command:
        export_format(out)
        spec = make_spec(backbone, image_size, layer, pooling, weights, resize)
        root = cache_root(cache_dir)
        with command.stage() as progress:
            dataset = scan(data, cache_dir=root, progress=progress)
            run_extract(dataset, spec, root, progress=progress)
        # Streamed from the store to the file: memory stays flat however many images there are.
        return_large_blocks()
        written = export_dataset_features(dataset, open_stores(spec, root), out)
    if as_json:
        render.print_json({"path": str(written.path), "rows": written.rows, "feature_dim": written.feature_dim,
                           "missing": list(written.missing), "format": export_format(out)})
        return
    render.stdout.print(f"wrote {written.rows} rows x {written.feature_dim} features to {written.path}"
                        + (f" ({render.plural(len(written.missing), 'image')} without features)" if written.missing else ""),
                        highlight=False)
