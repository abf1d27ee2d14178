"""Image classifiers for teachers and students. Inputs are ``(B, C, H, W)`` in [0, 1]."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU net (Hinton et al. 2015 used 2×1200 with dropout and a
    max-norm constraint for the teacher, 2×800 plain for the student)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        hidden: list[int] = (800, 800),  # type: ignore[assignment]
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        max_norm: float | None = None,
    ):
        super().__init__()
        c, h, w = input_shape
        widths = [c * h * w, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)
        self.max_norm = max_norm

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, V)
        return self.net(x)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Max-norm: each unit's incoming weight vector is rescaled to L2 ≤ max_norm
        (Srivastava et al. 2014), called by the trainer after every optimizer step."""
        if self.max_norm is None:
            return
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.renorm(m.weight, p=2, dim=0, maxnorm=self.max_norm))


class LeNet5(nn.Module):
    """LeCun et al. (1998); inputs smaller than 32×32 are zero-padded to 32×32."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.pad = (
            max(0, (32 - w) // 2),
            max(0, 32 - w - (32 - w) // 2),
            max(0, (32 - h) // 2),
            max(0, 32 - h - (32 - h) // 2),
        )
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = (max(h, 32) - 4) // 2
        side = (side - 4) // 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, V)
        return self.head(self.features(F.pad(x, self.pad)))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """Two conv blocks (width, 2·width) with batch norm, then global pooling."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32):
        super().__init__()
        c, _, _ = input_shape
        self.net = nn.Sequential(
            _conv_bn(c, width),
            _conv_bn(width, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            _conv_bn(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, V)
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet (He et al. 2016) for 28×28/32×32 inputs: three stages of basic blocks
    at widths w, 2w, 4w, the later two downsampling by 2."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 16,
        blocks: list[int] = (2, 2, 2),  # type: ignore[assignment]
    ):
        super().__init__()
        c, _, _ = input_shape
        layers: list[nn.Module] = [_conv_bn(c, width)]
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, V)
        return self.net(x)
