"""evaluation.cost: the per-image price of feature sets, in Lite0 passes."""

import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.evaluation.cost import MACS, pass_cost, set_cost


def test_lite_sizes_are_priced_by_their_multiply_adds():
    lite = [pass_cost(BackboneSpec(name=f"efficientnet_lite{i}")) for i in range(3)]
    assert lite[0] == 1.0
    assert lite == sorted(lite) and lite[2] == pytest.approx(MACS["efficientnet_lite2"] / MACS["efficientnet_lite0"])


def test_the_resize_policy_does_not_change_the_price_but_the_input_size_does():
    squash = pass_cost(BackboneSpec(name="efficientnet_lite1", resize="squash"))
    assert pass_cost(BackboneSpec(name="efficientnet_lite1", resize="letterbox")) == squash
    assert pass_cost(BackboneSpec(name="efficientnet_lite1", image_size=480)) == pytest.approx(4 * squash)


def test_a_vote_pays_once_per_distinct_feature_set():
    a, b = BackboneSpec(name="efficientnet_lite0", resize="squash"), BackboneSpec(name="efficientnet_lite2")
    assert set_cost([a, b, a]) == pytest.approx(pass_cost(a) + pass_cost(b))


def test_an_unlisted_backbone_is_priced_by_its_input_size():
    # "tiny" (tests/tiny_backbone.py, 32 px by default) is in no table of multiply-adds.
    assert "tiny" not in MACS
    assert pass_cost(BackboneSpec(name="tiny")) == pytest.approx((32 / 224) ** 2)
    assert pass_cost(BackboneSpec(name="tiny", image_size=64)) == pytest.approx((64 / 224) ** 2)
