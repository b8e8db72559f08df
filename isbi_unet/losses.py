"""Training losses for membrane segmentation, chosen with TrainUnetDataSet.py --loss.

    bce         binary cross-entropy on the logits (the article's loss)
    bce_dice    BCE + soft Dice on the membrane class (the minority class, ~22% of ISBI pixels)

Either takes an optional per-pixel weight map (the U-Net paper's border weights, --border_weight), which
scales the BCE term. Works in eager mode and inside nn.Graph.
"""

import oneflow as flow
import oneflow.nn as nn
import oneflow.nn.functional as F

from isbi_unet.formats import LOSS_FUNCTIONS


def soft_dice_loss(logits, label, eps=1.0):
    """1 - soft Dice of the membrane class (label 0), over the whole batch."""
    membrane = 1.0 - flow.sigmoid(logits)
    target = 1.0 - label
    overlap = (membrane * target).sum()
    return 1.0 - (2.0 * overlap + eps) / (membrane.sum() + target.sum() + eps)


class SegmentationLoss(nn.Module):
    def __init__(self, kind="bce"):
        super().__init__()
        if kind not in LOSS_FUNCTIONS:
            raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSS_FUNCTIONS)}")
        self.kind = kind

    def forward(self, logits, label, weight=None):
        if weight is None:
            loss = F.binary_cross_entropy_with_logits(logits, label)
        else:
            loss = (F.binary_cross_entropy_with_logits(logits, label, reduction="none") * weight).mean()
        if self.kind == "bce_dice":
            loss = loss + soft_dice_loss(logits, label)
        return loss
