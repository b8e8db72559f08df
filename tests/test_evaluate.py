"""training.evaluate: the validation scores that pick the best checkpoint."""

from types import SimpleNamespace

import oneflow as flow
import pytest

from dataloader import SelfDataSet
from isbi_unet.losses import SegmentationLoss
from isbi_unet.training import evaluate
from unet import UNet


def scores_for(val_set, make_logits):
    labels = iter(val_set.labels)
    # An engine whose model is only switched to eval mode and whose inference returns the given logits.
    engine = SimpleNamespace(model=UNet(width=4), infer=lambda image: flow.tensor(make_logits(next(labels))[None]))
    return evaluate(engine, val_set, SegmentationLoss("bce"), flow.device("cpu"), epoch=1)


def test_perfect_maps_score_one_and_wrong_ones_score_worse(data):
    val_set = SelfDataSet(f"{data}/train/image", f"{data}/train/label")
    perfect = scores_for(val_set, lambda label: (label * 2 - 1) * 20)
    assert perfect["v_rand"] == pytest.approx(1.0) and perfect["v_info"] == pytest.approx(1.0)
    assert perfect["pixel_error"] == 0.0 and perfect["val_loss"] < 1e-6
    # every membrane pixel called cell: all cells merge into one
    merged = scores_for(val_set, lambda label: label * 0 + 20)
    assert merged["v_rand"] < perfect["v_rand"] and merged["pixel_error"] > 0.05
    assert merged["val_loss"] > 1
