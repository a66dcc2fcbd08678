"""A tiny residual CNN with global average pooling: an example of bringing your own model.

cnnlab builds it from a study or run configuration:

    [model]
    factory = "examples/tiny_resnet.py:tiny_resnet"
    [model.args]
    width = 16

and calls tiny_resnet(in_shape, num_classes, **args): in_shape is (C, H, W) of the dataset
(1 or 3 channels, any size), num_classes its number of classes. Any function with that
signature that returns an nn.Module mapping (B, C, H, W) to (B, num_classes) logits works.
"""

from torch import nn


class Residual(nn.Module):
    """x + f(x): two 3x3 convs with BatchNorm; the skip connection keeps the shape."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.body(x))


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks: int = 2, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[Residual(width, dropout) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)  # global average pooling: any input size
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.pool(x).flatten(1))


def tiny_resnet(in_shape, num_classes, width: int = 16, blocks: int = 2, dropout: float = 0.0):
    return TinyResNet(in_shape[0], num_classes, width, blocks, dropout)
