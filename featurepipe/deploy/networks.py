"""The frozen networks a prediction needs, each built once and shared by every feature set on it.

A vote's feature sets are (backbone, resize policy) pairs: efficientnet_lite0 under squash,
center_crop and letterbox is one network seeing three views of each image. Building (~1-3 s per
EfficientNet-Lite on a CPU) and tracing (~1-2 s) were paid per feature set, so the demo's 9-set vote
built and traced 9 networks for one photo. Here a network is keyed by what changes its weights and
outputs (`network_key`: everything in the spec but the resize policy), built once per Networks
object, and run on the stacked views of all its feature sets.

How a batch runs depends on its size, measured in CPU seconds on the shared 2-core machine
(EfficientNet-Lite0/1/2, benchmarks/README.md): Keras' eager call needs no set-up but costs ~0.07 s
per row (0.5 s for 3 rows, 1.1 s for 12, 1.9 s for 24), a traced graph ~0.8-1.2 s once (trace
plus the graph optimiser's first call) then ~0.04 s per row (0.9-1.4 s for 3 rows, 1.0-1.3 s for
12). Up to EAGER_ROWS rows (a photo or two, all their views) therefore run eagerly, more through
one graph traced per network for any batch size (backbones.build.inference_function), so nothing
is ever traced twice. A .keras copy of the built network in the run directory was measured too and
not kept: loading Lite1 with safe_mode took 3.2 s against 2.7-3.2 s for building it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from featurepipe.backbones.spec import BackboneSpec

# Up to this many rows (images x views) a batch runs eagerly; more pay for a traced graph once
# (the two cost the same CPU time at ~12 rows).
EAGER_ROWS = 8


def network_key(spec: BackboneSpec) -> BackboneSpec:
    """The network a feature set runs on: its resolved spec with the resize policy left out (resizing
    happens on the pixels, before the network)."""
    return replace(spec.resolved(), resize=None)


class Network:
    """One built feature model: uint8 (n, size, size, 3) -> float32 (n, d) features."""

    def __init__(self, model, size: int):
        self.model, self.size = model, int(size)
        self._graph: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        if len(images) <= EAGER_ROWS:
            import keras

            return np.asarray(keras.ops.convert_to_numpy(self.model(images, training=False)), dtype=np.float32)
        if self._graph is None:
            from featurepipe.backbones.build import inference_function

            self._graph = inference_function(self.model, self.size)
        step = max(1, int(batch_size))
        return np.concatenate([np.asarray(self._graph(images[i:i + step]), dtype=np.float32)
                               for i in range(0, len(images), step)])


class Networks:
    """The networks built so far, by network_key; `get` builds a missing one (backbones.build)."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self._built: dict[BackboneSpec, Network] = {}

    def has(self, spec: BackboneSpec) -> bool:
        return network_key(spec) in self._built

    def get(self, spec: BackboneSpec) -> Network:
        key = network_key(spec)
        if key not in self._built:
            # Through the module, so that a test replacing build_feature_model sees every build.
            from featurepipe.backbones import build

            # The resize policy is part of the spec but not of the network: any one builds the same model.
            self._built[key] = Network(build.build_feature_model(spec.resolved(), self.cache_dir), key.image_size)
        return self._built[key]
