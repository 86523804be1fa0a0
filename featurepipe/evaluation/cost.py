"""What one feature set costs per image, in Lite0 passes: the unit the search orders and prices its
feature sets in (the anytime run's order and budget, the vote's member selection, the frontier).

A deterministic estimate, not a timing: published multiply-adds of each backbone at its default input
size, scaled by the square of the input size used, divided by EfficientNet-Lite0's at 224 px. A timing
would make the same data choose differently on a busy machine, and the choice would not be
reproducible. On this project's 2-core CPU the ratios track measured extraction time within ~20%
(benchmarks/README: Lite0 1.0, Lite1 ~1.5, Lite2 ~2.2). A backbone missing from the table (a user's own,
registered at run time, or a test's tiny one) is priced by its input size alone, as if it were Lite0
at that size: the price only orders feature sets and never changes their features.
"""

from __future__ import annotations

from featurepipe.backbones.spec import BackboneSpec

# Multiply-adds (millions) at the backbone's default input size, from the papers / Keras Applications.
MACS = {
    "efficientnet_lite0": 407, "efficientnet_lite1": 631, "efficientnet_lite2": 899,
    "vgg16": 15470, "vgg19": 19630, "resnet50": 4110, "resnet50v2": 4100, "inception_v3": 5720,
    "xception": 8360, "mobilenet_v2": 300, "mobilenet_v3_small": 56, "mobilenet_v3_large": 217,
    "densenet121": 2870, "efficientnet_b0": 390, "efficientnet_b1": 700, "efficientnet_b2": 1000,
    "efficientnet_b3": 1800, "efficientnet_v2_s": 8400, "convnext_tiny": 4500,
}
UNIT = ("efficientnet_lite0", 224)


def pass_cost(spec: BackboneSpec) -> float:
    """One image through `spec`'s backbone, in Lite0-at-224 passes (a+b: the sum of its parts)."""
    from featurepipe.backbones.registry import CONCAT, get_backbone

    spec = spec.resolved()
    if CONCAT in spec.name:
        return sum(pass_cost(BackboneSpec(name=part, resize=spec.resize, image_size=spec.image_size))
                   for part in spec.name.split(CONCAT))
    info = get_backbone(spec.name)
    size = spec.image_size or info.default_size
    unit = MACS[UNIT[0]]
    macs = MACS.get(spec.name, unit * (info.default_size / UNIT[1]) ** 2)
    return float(macs * (size / info.default_size) ** 2 / unit)


def set_cost(specs) -> float:
    """Per-image cost of a vote over `specs`: one pass per distinct feature set (decoding is shared)."""
    return float(sum(pass_cost(s) for s in dict.fromkeys(s.resolved() for s in specs)))
