"""Exceptions that carry a message meant for the user: what went wrong, where, and what to do."""

from __future__ import annotations


class FeaturepipeError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero."""


class DatasetError(FeaturepipeError):
    pass


class ImageDecodeError(FeaturepipeError):
    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class BackboneError(FeaturepipeError):
    pass


class WeightsUnavailableError(BackboneError):
    pass


class StoreError(FeaturepipeError):
    pass


class StoreLockedError(StoreError):
    pass


class StoreCorruptError(StoreError):
    pass


class DiskFullError(FeaturepipeError):
    """No space left (or quota exceeded) while writing: says where, and that nothing committed was lost."""


class TrustError(FeaturepipeError):
    """A run's artefact is not one this user's featurepipe wrote (copied from elsewhere, or edited)."""


_DISK_FULL_ERRNOS = {28, 122}   # ENOSPC, EDQUOT


def is_disk_full(error: BaseException) -> bool:
    """True for 'no space left on device' / 'disk quota exceeded', however the library reports it:
    OSError with errno, h5py's OSError with the text only, or sqlite's 'database or disk is full'."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    return "no space left" in text or "disk quota exceeded" in text or "database or disk is full" in text


def disk_full(error: BaseException, where) -> DiskFullError:
    return DiskFullError(
        f"no space left on the disk holding {where} ({str(error).strip().splitlines()[0] if str(error).strip() else error!r}); "
        f"free some space (or point --cache-dir / --out at another disk) and run again: "
        f"everything written before this point is intact")
