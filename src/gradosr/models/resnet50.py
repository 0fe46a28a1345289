"""ImageNet-style ResNet-50 (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), the backbone of the ImageNet open-set and OOD benchmarks (2,048-d features).
No torchvision: the same layout as torchvision's ``resnet50`` (v1.5, the stride on the
3x3 convolution of each bottleneck), randomly initialised.
"""

from __future__ import annotations

from torch import Tensor, nn

from gradosr.models._common import check_model_args


class Bottleneck(nn.Module):
    """1x1 (reduce) - 3x3 (stride) - 1x1 (expand x4) conv-BN, identity or 1x1 conv-BN
    shortcut, then ReLU: ``(B, in_planes, H, W)`` -> ``(B, 4 planes, H / stride, W / stride)``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = (nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False),
                                                  nn.BatchNorm2d(out))
                                    if stride != 1 or in_planes != out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ResNet50(nn.Module):
    """ImageNet-style ResNet-50: 7x7 stride-2 stem (64 channels) with BN+ReLU and a 3x3
    stride-2 max-pool; stages of 3/4/6/3 :class:`Bottleneck` blocks, widths 64/128/256/512
    (x4 out) and strides 1/2/2/2; global average pooling to 2,048-d features; ``head`` =
    Linear(2048, num_classes). Designed for 224x224 inputs (any size >= 32 works).

    Args:
        num_classes: number of known classes (>= 2).
        in_channels: 1 (grayscale) or 3 (RGB).
    """

    feature_dim: int = 2048

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes, self.in_channels = check_model_args(num_classes, in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        layers, in_planes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features: ``(B, C, H, W)`` -> ``(B, 2048)`` (globally pooled)."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``head(forward_features(x))``, ``(B, num_classes)``."""
        return self.head(self.forward_features(x))
