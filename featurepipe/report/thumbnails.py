"""The images behind a report's rows: finding a recorded path on disk, naming it relative to the
dataset, and the PNG thumbnail embedded in a gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

THUMB_PX = 128


def resolve_image(path: str, source: Optional[str]) -> Optional[Path]:
    """The image file behind an OOF path; relative paths are tried from the cwd and above the dataset."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    if candidate.is_file():
        return candidate
    if source:
        base = Path(source)
        for ancestor in [base, *base.parents]:
            if (ancestor / candidate).is_file():
                return ancestor / candidate
    return None


def short_path(path: str, source: Optional[str]) -> str:
    """The path relative to the dataset folder when it lies inside it (full path in the tooltip)."""
    if source:
        try:
            return str(Path(path).relative_to(Path(source)))
        except ValueError:
            pass
    return path


def thumbnail(path: Path) -> Optional[bytes]:
    """A PNG at most THUMB_PX on a side; None when the file cannot be read or decoded."""
    from featurepipe.core.errors import ImageDecodeError
    from featurepipe.data.images import thumbnail_png

    try:
        return thumbnail_png(path, THUMB_PX)
    except (ImageDecodeError, OSError):   # the gallery lists the path instead of a picture
        return None
