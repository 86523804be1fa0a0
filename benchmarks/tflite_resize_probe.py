"""Can a .tflite file take images of any size and resize them inside, as predict does? Measured.

Why export's TFLite files take fixed-size inputs fed by preprocess.py instead: this converts a
network that is only the in-graph resize (any input size, bilinear to SIZE, squash) with and
without antialiasing, runs it under LiteRT (ai-edge-litert) on demo photos, and reports whether
conversion and running work with TFLite's builtin ops, and how far the pixels are from Pillow's
antialiased bilinear (what predict feeds the backbone).

    python benchmarks/tflite_resize_probe.py [--images 8] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def convert(antialias: bool, size: int, folder: Path):
    import keras
    import tensorflow as tf

    images = keras.Input((None, None, 3), batch_size=1, dtype="float32", name="images")
    resized = keras.layers.Resizing(size, size, interpolation="bilinear", antialias=antialias)(images)
    model = keras.Model(images, resized)
    saved = folder / f"saved_{antialias}"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return converter.convert(), None
    except Exception as error:   # ConverterError: which ops are not builtins
        lines = [line.strip() for line in str(error).splitlines() if line.strip().startswith(("Custom ops", "Select TF ops"))]
        return None, (lines[0] if lines else str(error).splitlines()[0])[:200] + " (not a TFLite builtin)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    from ai_edge_litert.interpreter import Interpreter

    from featurepipe.deploy import recipe

    demo = sorted(p for p in (Path(__file__).resolve().parents[1] / "data" / "demo").rglob("*")
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.images]
    with tempfile.TemporaryDirectory() as scratch:
        for antialias in (True, False):
            flatbuffer, error = convert(antialias, args.size, Path(scratch))
            if flatbuffer is None:
                print(f"antialias={antialias}: conversion with builtin ops FAILS: {error}")
                continue
            interpreter = Interpreter(model_content=flatbuffer)
            worst, mean = 0.0, []
            for path in demo:
                whole = recipe.full_image(path).astype(np.float32)[None]
                interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], whole.shape)
                interpreter.allocate_tensors()
                interpreter.set_tensor(interpreter.get_input_details()[0]["index"], whole)
                interpreter.invoke()
                got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
                diff = np.abs(np.round(got) - recipe.sized_image(path, args.size, "squash"))
                worst, mean = max(worst, float(diff.max())), mean + [float(diff.mean())]
            print(f"antialias={antialias}: converts and runs on any input size under LiteRT; vs Pillow on "
                  f"{len(demo)} demo photos: mean |pixel diff| {np.mean(mean):.2f} grey levels, max {worst:.0f}")


if __name__ == "__main__":
    main()
