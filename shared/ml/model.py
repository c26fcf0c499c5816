"""A ResNet-style CNN for single mammographic views, in plain torch."""

from __future__ import annotations

import math
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
    # The stem's max pool halves the resolution once more before the first stage: cheaper,
    # but it blurs what tells lesions apart (spicules, margins, specks) at this input size.
    stem_pool: bool = True
    stage_channels: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    dropout: float = 0.1
    # 16 keeps the last stage at 1/16 of the input (dilated instead of strided), so the class
    # activation map that serves as the heatmap is twice as fine as a plain ResNet's 1/32.
    output_stride: int = 16
    # Spatial pooling of the last feature map: log-sum-exp with this sharpness (large: the
    # maximum, one lesion decides; small: the mean). LSE passes gradient to every position
    # that is nearly as strong as the peak, which trains much faster than a hard maximum.
    pool_sharpness: float = 5.0
    # Output 0 is the malignancy logit. Output 1, trained on "any lesion" (benign or
    # malignant) when labels say so, gives the network three times as many positives to learn
    # what a lesion looks like before it learns which lesions are malignant.
    outputs: int = 2
    architecture: str = field(default="screening-resnet-v1")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage_channels"] = list(self.stage_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScreeningNetConfig:
        return cls(**{**data, "stage_channels": tuple(data["stage_channels"])})


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
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

    Near-maximum (log-sum-exp) pooling over the final feature map: a lesion is small, and an
    average over the whole breast would dilute it.
    """

    def __init__(self, config: ScreeningNetConfig) -> None:
        super().__init__()
        self.config = config
        stem: list[nn.Module] = [
            nn.Conv2d(config.in_channels, config.stem_channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(config.stem_channels),
            nn.ReLU(inplace=True),
        ]
        if config.stem_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        in_ch = config.stem_channels
        reduction, dilation = (4 if config.stem_pool else 2), 1  # the stem's
        for index, out_ch in enumerate(config.stage_channels):
            for block in range(config.blocks_per_stage):
                stride = 1
                if block == 0 and index > 0:
                    if reduction < config.output_stride:
                        stride, reduction = 2, reduction * 2
                    else:
                        dilation *= 2
                layers.append(ResidualBlock(in_ch, out_ch, stride, dilation))
                in_ch = out_ch
        self.stages = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(in_ch, config.outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, H, W) -> (B, C0, H/4, W/4) -> (B, C, H/s, W/s), s the output stride
        return self.stages(self.stem(x))  # type: ignore[no-any-return]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B, C)
        r = self.config.pool_sharpness
        flat = features.flatten(2)
        return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        # -> (B, C) -> (B, outputs)
        pooled = self.pool(self.features(x))
        outputs: torch.Tensor = self.head(self.dropout(pooled))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The malignancy logit, (B,)."""
        return self.all_outputs(x)[:, 0]

    def outputs_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs (B, outputs), maps (B, outputs, H/s, W/s)) from one pass.

        A map is the linear head applied at every position of the last feature map (the class
        activation map, Zhou et al. 2016): the model's own evidence at each place. Pooling the
        features and then applying the head gives the outputs; as the pooling is near-max,
        an output is close to its map's peak.
        """
        features = self.features(x)
        outputs: torch.Tensor = self.head(self.dropout(self.pool(features)))
        maps = torch.einsum("oc,bchw->bohw", self.head.weight, features)
        return outputs, maps + self.head.bias.view(1, -1, 1, 1)

    def forward_with_heatmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(malignancy logits (B,), malignancy maps (B, H/s, W/s))."""
        outputs, maps = self.outputs_and_maps(x)
        return outputs[:, 0], maps[:, 0]


def build_model(config: ScreeningNetConfig) -> ScreeningNet:
    return ScreeningNet(config)


def heatmaps_within_scores(probabilities: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Per-position probabilities (B, h, w) scaled so that no position shows more than its
    view's probability (B,), keeping the map's shape.

    The class activation map through the sigmoid is not bounded by the view's score: the head
    applied at one position can exceed the pooled output. Unscaled, a view scored 0.19 could
    show a broad red region and draw a reader to places the model does not find suspicious;
    scaled, a map is only as hot as the score it explains.
    """
    peaks = maps.flatten(1).amax(dim=1).clamp(min=1e-6)
    factor = torch.clamp(probabilities / peaks, max=1.0)
    return maps * factor.view(-1, 1, 1)
