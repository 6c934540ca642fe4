"""Model factories for the `module:` teacher tests (imported as `teacher_factories`, tests/ is on sys.path)."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Conv, pool, linear; exposes num_classes as timm models do."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_net(num_classes: int = 10) -> TinyNet:
    return TinyNet(num_classes)


def fixed_net() -> nn.Module:
    """Takes no num_classes and has no num_classes attribute: 7 outputs, found by a forward pass."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))


def not_a_module() -> str:
    return "not a model"


NOT_CALLABLE = 3
