"""Losses against hand-computed values."""

import math

import oneflow as flow
import pytest

from isbi_unet.losses import SegmentationLoss, soft_dice_loss


def test_bce_matches_the_formula_and_weights_scale_it():
    logits = flow.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    label = flow.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    expected = (math.log(2) + (2 + math.log1p(math.exp(-2))) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))) / 4
    assert SegmentationLoss("bce")(logits, label).item() == pytest.approx(expected, rel=1e-5)
    weight = flow.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    assert SegmentationLoss("bce")(logits, label, weight).item() == pytest.approx(2 * math.log(2) / 4, rel=1e-5)


def test_dice_is_zero_for_a_confident_correct_map_and_one_for_the_opposite():
    label = flow.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert soft_dice_loss((label * 2 - 1) * 50, label).item() == pytest.approx(0.0, abs=1e-6)
    # membrane predicted everywhere it is not: overlap 0, so 1 - eps / (2 + 2 + eps) with eps = 1
    assert soft_dice_loss((1 - label * 2) * 50, label).item() == pytest.approx(1 - 1 / 5, abs=1e-6)


def test_bce_dice_is_the_sum():
    logits, label = flow.randn(2, 1, 8, 8), (flow.rand(2, 1, 8, 8) > 0.5).float()
    total = SegmentationLoss("bce_dice")(logits, label).item()
    assert total == pytest.approx(
        SegmentationLoss("bce")(logits, label).item() + soft_dice_loss(logits, label).item(), rel=1e-5
    )


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        SegmentationLoss("focal")
