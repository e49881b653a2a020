"""MTP losses: the fused head-by-head schedule used in training, and the naive reference."""

from pretrain.loss.fused_ce import IGNORE_INDEX, fused_cross_entropy
from pretrain.loss.naive import naive_mtp_loss
from pretrain.loss.schedule import HeadStack, mtp_loss

__all__ = ["IGNORE_INDEX", "HeadStack", "fused_cross_entropy", "mtp_loss", "naive_mtp_loss"]
