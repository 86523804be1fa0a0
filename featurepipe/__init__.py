"""featurepipe: image classifiers from very little data, the classic Keras transfer-learning recipe as
one resumable pipeline (frozen ImageNet base -> cached features -> cross-validated heads -> optional
fine-tuning -> predict, export, report).

The public API is what `__all__` lists: `run` / `load_run` (the whole job, with exactly the CLI's
defaults), the stages (each a plain function with typed inputs and outputs), their configs, the
backbone and head registries, and the errors. Everything is imported on first use, so `import
featurepipe` stays cheap (no TensorFlow, no pandas) and the package's layers (tests/test_layering.py)
keep importing only downwards.

    import featurepipe
    result = featurepipe.run("data/demo", quick=True)     # = `featurepipe run data/demo --quick`
    result.nested["accuracy"]                             # the nested-CV headline and its interval
    result.predict(["photo.jpg"])                         # a DataFrame, the columns of `predict --json`
    featurepipe.load_run(result.run_dir).report_path      # the same object for a run written earlier

`SearchConfig()` is what `featurepipe run` searches and `SearchConfig.quick()` what `run --quick` and
`evaluate` search: the CLI builds its config with the same two functions.
"""

from __future__ import annotations

from importlib import import_module, metadata

try:
    __version__ = metadata.version("featurepipe")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0.0.0"

# name -> the module that defines it
_EXPORTS = {
    # stages, in pipeline order
    "scan": "featurepipe.data.dataset",
    "Dataset": "featurepipe.data.dataset",
    "extract": "featurepipe.extraction.extract",
    "evaluate": "featurepipe.evaluation.evaluate",
    "evaluate_features": "featurepipe.evaluation.evaluate",
    "inspect_dataset": "featurepipe.inspection.inspect",
    "finetune": "featurepipe.training.finetune",
    "baseline": "featurepipe.training.baseline",
    "predict": "featurepipe.deploy.predict",
    "export": "featurepipe.deploy.export",
    "write_report": "featurepipe.report.write",
    "run": "featurepipe.pipeline",
    "load_run": "featurepipe.pipeline",
    "RunResult": "featurepipe.pipeline",
    "RunInterrupted": "featurepipe.pipeline",   # Ctrl-C during run: .run_dir keeps the last finished stage
    # what the stages take
    "SearchConfig": "featurepipe.evaluation.config",
    "FinetuneConfig": "featurepipe.training.config",
    "BackboneSpec": "featurepipe.backbones.spec",
    "AugmentSpec": "featurepipe.data.augment",
    "AugmentPolicy": "featurepipe.data.augment",
    # registries
    "BackboneInfo": "featurepipe.backbones.registry",
    "PretrainedConfig": "featurepipe.backbones.registry",
    "register_backbone": "featurepipe.backbones.registry",
    "registered_backbone": "featurepipe.backbones.registry",
    "get_backbone": "featurepipe.backbones.registry",
    "HeadEntry": "featurepipe.heads.registry",
    "register_head": "featurepipe.heads.registry",
    "registered_head": "featurepipe.heads.registry",
    "head_entry": "featurepipe.heads.registry",
    "head_names": "featurepipe.heads.registry",
    # errors
    "FeaturepipeError": "featurepipe.core.errors",
    "UsageError": "featurepipe.core.errors",
    "DatasetError": "featurepipe.core.errors",
    "ImageDecodeError": "featurepipe.core.errors",
    "BackboneError": "featurepipe.core.errors",
    "StoreError": "featurepipe.core.errors",
    "TrustError": "featurepipe.core.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featurepipe' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value       # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
