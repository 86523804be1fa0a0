"""Exceptions that carry a message meant for the user: what went wrong, where, and what to do."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator, Optional


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


class NotWritableError(FeaturepipeError):
    """A folder featurepipe must write to is read-only (or not this user's): says where, and that nothing
    committed was lost."""


class TrustError(FeaturepipeError):
    """A run's artefact is not one this user's featurepipe wrote (copied from elsewhere, or edited)."""


_DISK_FULL_ERRNOS = {28, 122}   # ENOSPC, EDQUOT
_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


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


def is_read_only(error: BaseException) -> bool:
    """True for a write refused because the place is read-only or not ours: OSError with errno (h5py's
    with the text only), or sqlite's 'attempt to write a readonly database'."""
    if isinstance(error, OSError) and error.errno in _READ_ONLY_ERRNOS:
        return True
    text = str(error).lower()
    return "readonly database" in text or "read-only file system" in text or "permission denied" in text


def not_writable(error: BaseException, where) -> NotWritableError:
    reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [repr(error)])[0]
    return NotWritableError(
        f"cannot write to {where} ({reason}): it is read-only or not yours; make it writable (or point "
        f"--cache-dir / --out at a folder you can write) and run again: everything written before this point is intact")


def write_failure(error: BaseException, where) -> Optional[FeaturepipeError]:
    """The one-line error for a write that failed for lack of space or permission, else None (a bug,
    or damage, which keeps its own handling)."""
    if is_disk_full(error):
        return disk_full(error, where)
    if is_read_only(error):
        return not_writable(error, where)
    return None


@contextmanager
def writing_to(where) -> Iterator[None]:
    """Around a stage that writes under WHERE (a cache root, a sqlite file): a full disk or a read-only
    folder, from the OS, h5py or sqlite, becomes DiskFullError / NotWritableError naming the file the
    OS named (else WHERE). Everything else passes unchanged."""
    try:
        yield
    except FeaturepipeError:
        raise
    except Exception as error:
        failure = write_failure(error, getattr(error, "filename", None) or where)
        if failure is None:
            raise
        raise failure from None
