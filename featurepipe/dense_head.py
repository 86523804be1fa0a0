"""The dense head's import path before the package was cut into stage folders (0.1.0).

A pickle names each object's class by module, and a soft-vote ensemble or a cached refit pickled by
0.1.0 with a dense member names `featurepipe.dense_head.DenseHeadClassifier`. This module keeps that
name resolving; new code imports featurepipe.heads.dense. Nothing else lives here."""

from featurepipe.heads.dense import DenseHeadClassifier

__all__ = ["DenseHeadClassifier"]
