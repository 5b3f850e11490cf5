"""Fully convolutional networks that turn a frame into per-class atom probability maps.

Two layouts share one interface (``forward(x: (B, 1, H, W)) -> logits (B, C + 1, H, W)``,
channel 0 is background, channels ``1..C`` the atom classes; ``H`` and ``W`` must be multiples
of :attr:`~DilatedUNet.multiple`):

- :class:`DilatedUNet`, ours: two pooling levels and a residual *dilated* bottleneck at 1/4
  resolution. Dilations ``(1, 2, 4, 8)`` give a receptive field of about 30 Å at the model
  sampling of 0.2 Å/px, wide enough to see the lattice around a low-dose column, with few
  channels at full resolution (where convolutions cost most).
- :class:`DefaultUNet`, the baseline: the widely used layout with filters 16-32-64-128,
  three pooling levels and two convolutions per level.

Both take a ``widths`` tuple so size and speed are set from the model card; see
:func:`build_model`. :func:`fuse_batchnorm` folds BatchNorm into the preceding convolution for
inference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _DilatedBlock(nn.Module):
    """Residual block: 3x3 convolution at ``dilation`` + BN + ReLU, added to its input."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class DilatedUNet(nn.Module):
    """U-Net with two pooling levels and a dilated residual bottleneck.

    ``widths = (c0, c1, c2)``: channels at full, 1/2 and 1/4 resolution. ``dilations``: one
    residual block per entry at 1/4 resolution. ``n_classes`` atom classes (+1 background).
    Input ``(B, 1, H, W)`` with ``H, W`` multiples of 4; output logits ``(B, n_classes + 1, H, W)``.
    """

    multiple = 4

    def __init__(self, n_classes: int, widths: tuple[int, int, int] = (16, 32, 48), dilations: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        c0, c1, c2 = widths
        self.enc0 = _conv_bn(1, c0)
        self.enc1 = nn.Sequential(_conv_bn(c0, c1), _conv_bn(c1, c1))
        self.enc2 = _conv_bn(c1, c2)
        self.bottleneck = nn.Sequential(*[_DilatedBlock(c2, d) for d in dilations])
        self.dec1 = _conv_bn(c2 + c1, c1)
        self.dec0 = _conv_bn(c1 + c0, c0)
        self.head = nn.Conv2d(c0, n_classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(F.max_pool2d(e0, 2))
        b = self.bottleneck(self.enc2(F.max_pool2d(e1, 2)))
        d1 = self.dec1(torch.cat([F.interpolate(b, scale_factor=2.0, mode="nearest"), e1], dim=1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="nearest"), e0], dim=1))
        return self.head(d0)


class DefaultUNet(nn.Module):
    """The common default U-Net: filters 16-32-64-128, three pooling levels, two convs per level.

    Input ``(B, 1, H, W)`` with ``H, W`` multiples of 8; output ``(B, n_classes + 1, H, W)``.
    """

    multiple = 8

    def __init__(self, n_classes: int, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(_conv_bn(cin, cout), _conv_bn(cout, cout))

        self.e0, self.e1, self.e2, self.e3 = double(1, c0), double(c0, c1), double(c1, c2), double(c2, c3)
        self.d2, self.d1, self.d0 = double(c3 + c2, c2), double(c2 + c1, c1), double(c1 + c0, c0)
        self.head = nn.Conv2d(c0, n_classes + 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.e0(x)
        e1 = self.e1(F.max_pool2d(e0, 2))
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2.0, mode="nearest")

        d2 = self.d2(torch.cat([up(e3), e2], 1))
        d1 = self.d1(torch.cat([up(d2), e1], 1))
        d0 = self.d0(torch.cat([up(d1), e0], 1))
        return self.head(d0)


ARCHITECTURES = {"dilated-unet": DilatedUNet, "default-unet": DefaultUNet}


def build_model(arch: str, n_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate a network by name (``"dilated-unet"`` or ``"default-unet"``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r}: must be one of {sorted(ARCHITECTURES)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return ARCHITECTURES[arch](n_classes, **kw)


@torch.no_grad()
def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d -> BatchNorm2d`` pair into the convolution (inference only, in place).

    Handles the two patterns used here: ``nn.Sequential(conv, bn, ...)`` and
    :class:`_DilatedBlock`. Returns ``module`` (in eval mode).
    """
    module.eval()

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, bias=True
        ).to(conv.weight.device, conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        return fused

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential) and len(child) >= 2 and isinstance(child[0], nn.Conv2d) and isinstance(child[1], nn.BatchNorm2d):
            rest = list(child)[2:]
            setattr(module, name, nn.Sequential(fold(child[0], child[1]), *rest))
        elif isinstance(child, _DilatedBlock):
            child.conv = fold(child.conv, child.bn)
            child.bn = nn.Identity()  # type: ignore[assignment]
        else:
            fuse_batchnorm(child)
    return module
