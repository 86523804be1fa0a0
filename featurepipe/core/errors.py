"""Exceptions that carry a message meant for the user: what went wrong, where, and what to do."""

from __future__ import annotations


class FeaturepipeError(Exception):
    """Base class; the CLI prints these without a traceback and exits non-zero. Anything else that
    reaches the CLI is a bug and keeps its traceback."""


class UsageError(FeaturepipeError, ValueError):
    """A bad argument or option (a value out of range, an unknown name, options that contradict each
    other). A ValueError too, so code that caught the bare ValueErrors raised before still works;
    the CLI exits with 2 for these, as for its own usage errors."""


class DatasetError(FeaturepipeError):
    pass


class ImageDecodeError(FeaturepipeError):
    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Rebuilt from (path, reason), not from the formatted message alone: a Dask worker that
        # raises it must be able to send it back to the driver.
        return type(self), (self.path, self.reason)


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
