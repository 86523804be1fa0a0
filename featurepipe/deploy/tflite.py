"""TFLite's side of export, shared by the export (which writes and checks the file) and the agreement
check (which runs it on the run's images): the runtime that loads a .tflite file, and the names of a
vote's fixed-size inputs. Its own module so that export and agreement do not import each other.
"""

from __future__ import annotations

import os

from featurepipe.backbones.fingerprint import package_version
from featurepipe.rundir.model import RunModel


def sized_input_name(member: RunModel) -> str:
    """The name of the fixed-size input that a member of a TFLite vote reads."""
    return f"images_{member.image_size}_{member.resize}"


def tflite_interpreter(path: str | os.PathLike):
    """(interpreter, runtime name) for a .tflite file: LiteRT (`ai-edge-litert`, TensorFlow's successor
    to tf.lite.Interpreter) where installed, else TensorFlow's own copy of the same runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=str(path)), f"ai-edge-litert {package_version('ai-edge-litert')}"
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # its deprecation notice points at LiteRT, which is absent
            return tf.lite.Interpreter(model_path=str(path)), f"tf.lite.Interpreter (tensorflow {tf.__version__})"
