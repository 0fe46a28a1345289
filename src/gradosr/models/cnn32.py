"""The 9-layer "classifier32" CNN used throughout the open-set recognition literature.

Introduced by Neal et al., "Open Set Learning with Counterfactual Images" (ECCV 2018),
and reused by Chen et al. (ARPL, TPAMI 2021) and Vaze et al., "Open-Set Recognition: a
Good Closed-Set Classifier is All You Need?" (ICLR 2022).
"""

from __future__ import annotations

from torch import Tensor, nn

from gradosr.models._common import check_model_args


def _conv_bn_lrelu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.2),
    ]


class CNN32(nn.Module):
    """The OSR "classifier32" CNN (Neal et al. 2018; ARPL; Vaze et al. 2022).

    Layout: Dropout2d(0.2) on the input; three blocks of three 3x3 convolutions
    (bias-free, each followed by BatchNorm2d and LeakyReLU(0.2)) with widths
    64-64-128, 128-128-128 and 128-128-128, the last convolution of each block having
    stride 2, and Dropout2d(0.2) between blocks; global average pooling to a 128-d
    penultimate feature; ``head`` = Linear(128, num_classes).

    Args:
        num_classes: number of known classes (>= 2).
        in_channels: 1 (grayscale) or 3 (RGB).

    Input: float tensor of shape ``(B, in_channels, H, W)``, designed for 32x32 (28x28
    also works). Output of :meth:`forward`: logits of shape ``(B, num_classes)``.
    """

    feature_dim: int = 128

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes, self.in_channels = check_model_args(num_classes, in_channels)
        self.features = nn.Sequential(
            nn.Dropout2d(0.2),
            *_conv_bn_lrelu(in_channels, 64),
            *_conv_bn_lrelu(64, 64),
            *_conv_bn_lrelu(64, 128, stride=2),
            nn.Dropout2d(0.2),
            *_conv_bn_lrelu(128, 128),
            *_conv_bn_lrelu(128, 128),
            *_conv_bn_lrelu(128, 128, stride=2),
            nn.Dropout2d(0.2),
            *_conv_bn_lrelu(128, 128),
            *_conv_bn_lrelu(128, 128),
            *_conv_bn_lrelu(128, 128, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features: ``(B, C, H, W)`` -> ``(B, 128)`` (globally pooled)."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``(B, C, H, W)`` -> ``(B, num_classes)``; ``head(forward_features(x))``."""
        return self.head(self.forward_features(x))
