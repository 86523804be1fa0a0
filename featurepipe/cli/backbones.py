"""`featurepipe backbones`: the backbone registry."""

from __future__ import annotations

from featurepipe.cli.options import AsJson


def backbones(as_json: bool = AsJson) -> None:
    """List the backbone registry with input sizes and feature dims."""
    from featurepipe.cli import render
    from featurepipe.backbones.registry import BACKBONES

    rows = [[b.name, b.default_size, b.min_size, b.feature_dim, b.preprocess, b.default_resize, b.description]
            for b in BACKBONES.values()]
    if as_json:
        render.print_json([dict(zip(["name", "input_size", "min_size", "feature_dim", "preprocess", "resize",
                                     "description"], row)) for row in rows])
        return
    render.table("backbones", ["name", "size", "min", "dim", "preprocess", "resize", "notes"], rows)
