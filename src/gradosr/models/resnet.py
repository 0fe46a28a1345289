"""CIFAR-style ResNet-18 (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), the classifier used by Lee & AlRegib (ICIP 2021).
"""

from __future__ import annotations

from torch import Tensor, nn

from gradosr.models._common import check_model_args


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, then ReLU.

    Maps ``(B, in_planes, H, W)`` to ``(B, planes, H / stride, W / stride)``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al., CVPR 2016).

    Layout: 3x3 conv stem (stride 1, 64 channels) with BN+ReLU and no max-pool; four
    stages of two :class:`BasicBlock` each, widths 64/128/256/512 and strides 1/2/2/2;
    global average pooling to a 512-d penultimate feature; ``head`` =
    Linear(512, num_classes).

    Args:
        num_classes: number of known classes (>= 2).
        in_channels: 1 (grayscale) or 3 (RGB).

    Input: float tensor of shape ``(B, in_channels, H, W)``, designed for 32x32 (28x28
    also works). Output of :meth:`forward`: logits of shape ``(B, num_classes)``.
    """

    feature_dim: int = 512

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes, self.in_channels = check_model_args(num_classes, in_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.layer1 = self._make_layer(64, 64, stride=1)
        self.layer2 = self._make_layer(64, 128, stride=2)
        self.layer3 = self._make_layer(128, 256, stride=2)
        self.layer4 = self._make_layer(256, 512, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(self.feature_dim, num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features: ``(B, C, H, W)`` -> ``(B, 512)`` (globally pooled)."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``(B, C, H, W)`` -> ``(B, num_classes)``; ``head(forward_features(x))``."""
        return self.head(self.forward_features(x))
