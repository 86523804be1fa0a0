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
