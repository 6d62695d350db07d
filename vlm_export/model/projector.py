"""MobileVLM's Lightweight Downsample Projectors, with the official module and key names.

LDP (`ldpnet`, V1)                           LDPv2 (`ldpnetv2`, V2)
  Linear(D->C) GELU Linear(C->C)               Linear(D->C) GELU Linear(C->C)
  tokens -> C x 24 x 24                        tokens -> C x 24 x 24
  InvertedResidual(stride 1, residual)         AvgPool 2x2 -> 12 x 12
  InvertedResidual(stride 2) -> 12 x 12        + depthwise 3x3 conv (PEG, residual)
  -> 144 tokens                                -> 144 tokens

The inverted residual mirrors torchvision's MobileNetV3 block with no expansion and a
channel LayerNorm (torchvision does not import beside this torch build, so it is restated here
with the same submodule indices, so checkpoint keys line up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape  # (B, N, C)
    side = math.isqrt(n)
    return x.permute(0, 2, 1).reshape(b, c, side, side)  # (B, C, H, W)


def _grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).permute(0, 2, 1)  # (B, H*W, C)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map (MobileVLM's LayerNormAct2d, no activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return scale * x


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion: dw3x3 -> LN -> Hardswish -> SE -> pw1x1 -> LN."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                LayerNorm2d(channels, eps=1e-5),
                nn.Hardswish(),
            ),
            SqueezeExcitation(channels, _make_divisible(channels // 4, 8)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-5)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class LDPBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Identity at index 0 keeps the official key indices (mlp.1, mlp.3, mb_block.1, mb_block.2).
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(out_dim, 1), InvertedResidual(out_dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (B, 576, C)
        x = self.mb_block(_tokens_to_grid(x))  # (B, C, 12, 12)
        return _grid_to_tokens(x)  # (B, 144, C)


class LDPNetProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.model = LDPBlock(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TokenDownLayer(nn.Module):
    def __init__(self, grid: int):
        super().__init__()
        self.dwn = nn.Sequential(nn.AdaptiveAvgPool2d((grid, grid)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _grid_to_tokens(self.dwn(_tokens_to_grid(x)))


class PosInjectLayer(nn.Module):
    """PEG: a depthwise 3x3 conv added back to its input (positional information)."""

    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_grid(x)
        return _grid_to_tokens(self.peg(grid) + grid)


class LDPNetV2Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, grid: int):
        super().__init__()
        self.mlp = FeatureIRLayer(in_dim, out_dim)
        self.dwn = TokenDownLayer(grid // 2)
        self.peg = PosInjectLayer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(self.dwn(self.mlp(x)))


PROJECTORS = {
    "ldpnet": lambda in_dim, out_dim, grid: LDPNetProjector(in_dim, out_dim),
    "ldpnetv2": lambda in_dim, out_dim, grid: LDPNetV2Projector(in_dim, out_dim, grid),
}


def build_projector(kind: str, in_dim: int, out_dim: int, grid: int) -> nn.Module:
    return PROJECTORS[kind](in_dim, out_dim, grid)
