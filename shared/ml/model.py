"""A ResNet-style CNN for single mammographic views, in plain torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ScreeningNetConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""

    input_height: int = 512
    input_width: int = 416
    in_channels: int = 1
    stem_channels: int = 16
    stage_channels: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    dropout: float = 0.1
    architecture: str = field(default="screening-resnet-v1")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage_channels"] = list(self.stage_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScreeningNetConfig:
        return cls(**{**data, "stage_channels": tuple(data["stage_channels"])})


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ScreeningNet(nn.Module):
    """View-level malignancy logit.

    Global max pooling over the final feature map: a lesion is small, and an average over the
    whole breast would dilute it.
    """

    def __init__(self, config: ScreeningNetConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, config.stem_channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(config.stem_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = []
        in_ch = config.stem_channels
        for index, out_ch in enumerate(config.stage_channels):
            for block in range(config.blocks_per_stage):
                stride = 2 if block == 0 and index > 0 else 1
                layers.append(ResidualBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.stages = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, H, W) -> (B, C0, H/4, W/4)
        features = self.stem(x)
        # -> (B, C, H/32, W/32)
        features = self.stages(features)
        # -> (B, C) -> (B,)
        pooled = torch.amax(features, dim=(2, 3))
        logits: torch.Tensor = self.head(self.dropout(pooled)).squeeze(1)
        return logits


def build_model(config: ScreeningNetConfig) -> ScreeningNet:
    return ScreeningNet(config)
