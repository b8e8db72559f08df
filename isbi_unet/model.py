"""U-Net (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597) in OneFlow: the article's model, after
milesial/Pytorch-UNet, with its `bilinear=True` channel mismatch fixed and a `width` knob (channels of the
first level; the paper uses 64). `unet.py` at the top keeps the article's name for it.
"""

import oneflow as flow
import oneflow.nn as nn
import oneflow.nn.functional as F


class DoubleConv(nn.Module):
    """(3x3 conv => BatchNorm => ReLU) * 2, 'same' padding."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        # No conv bias: BatchNorm's shift absorbs it (same function class), and OneFlow's CPU bias add is slow.
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max pool, then DoubleConv."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class UpConv2x2(nn.ConvTranspose2d):
    """ConvTranspose2d(kernel_size=2, stride=2), same parameters, computed as a 1x1 conv plus a pixel shuffle.

    With stride equal to kernel size the four kernel taps never overlap, so each output 2x2 block is one
    matrix product of the input pixel; the result is identical. OneFlow 0.9.0's CPU transposed conv is
    several times slower than this (docs/speed.md).
    """

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x):
        n, c, h, w = x.shape
        o = self.weight.shape[1]
        # weight is (in, out, 2, 2); as a 1x1 conv it must be (out * 2 * 2, in, 1, 1), ordered (o, ky, kx).
        kernel = self.weight.permute(1, 2, 3, 0).reshape(o * 4, c, 1, 1)
        y = F.conv2d(x, kernel).reshape(n, o, 2, 2, h, w)
        y = y.permute(0, 1, 4, 2, 5, 3).reshape(n, o, 2 * h, 2 * w)
        return y + self.bias.reshape(1, o, 1, 1)


class Up(nn.Module):
    """Upsample x1, pad it to the skip connection x2, concatenate, DoubleConv.

    `in_channels` is the channel count after concatenation. Bilinear upsampling keeps x1's channels,
    so x1 must already carry in_channels // 2 (UNet halves the deepest level for that); the transposed
    convolution halves them itself.
    """

    def __init__(self, in_channels, out_channels, bilinear=False):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = UpConv2x2(in_channels, in_channels // 2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        # Odd sizes lose a pixel in max pooling; pad the upsampled map back to the skip's size.
        dy = x2.shape[2] - x1.shape[2]
        dx = x2.shape[3] - x1.shape[3]
        if dy or dx:
            x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(flow.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    """Four poolings, so inputs need height and width of at least 16; any size >= 16 works."""

    def __init__(self, n_channels=1, n_classes=1, bilinear=False, width=64):
        super().__init__()
        self.n_channels, self.n_classes, self.bilinear, self.width = n_channels, n_classes, bilinear, width
        w = width
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 16 * w // factor)
        self.up1 = Up(16 * w, 8 * w // factor, bilinear)
        self.up2 = Up(8 * w, 4 * w // factor, bilinear)
        self.up3 = Up(4 * w, 2 * w // factor, bilinear)
        self.up4 = Up(2 * w, w, bilinear)
        self.outc = OutConv(w, n_classes)

    def config(self):
        """What it takes to rebuild this model; stored in every checkpoint."""
        return dict(n_channels=self.n_channels, n_classes=self.n_classes, bilinear=self.bilinear, width=self.width)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
