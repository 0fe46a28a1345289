"""Classifiers for open-set recognition and helpers that work on any classifier.

Every built-in model takes ``(num_classes, in_channels=1)``, has a ``head``
(``nn.Linear``), a ``feature_dim`` and ``forward_features(x) -> (B, feature_dim)``, and
``forward(x) == head(forward_features(x))`` returns ``(B, num_classes)`` logits.
"""

from __future__ import annotations

from gradosr.models.cnn32 import CNN32
from gradosr.models.heads import eval_mode, find_head, find_head_name, reset_parameters, resize_head, set_head
from gradosr.models.lenet import LeNet
from gradosr.models.registry import available_models, build_model
from gradosr.models.resnet import BasicBlock, ResNet18
from gradosr.models.resnet50 import Bottleneck, ResNet50

__all__ = [
    "build_model",
    "available_models",
    "eval_mode",
    "find_head",
    "find_head_name",
    "set_head",
    "resize_head",
    "reset_parameters",
    "LeNet",
    "CNN32",
    "ResNet18",
    "BasicBlock",
    "ResNet50",
    "Bottleneck",
]
