"""The U-Net of isbi_unet/model.py in PyTorch, module for module: the architecture of a bioimage.io package's
pytorch_state_dict weights (export_onnx.py --bioimageio copies this file into the package).

    model = UNet(n_channels=1, n_classes=1, width=16)
    model.load_state_dict(state_dict, strict=True)   # the OneFlow checkpoint's keys, every one
    prob = model.eval()(x)                           # Nx1xHxW, H and W multiples of 16 -> cell probability

Every parameter and buffer has the OneFlow model's name and shape, so the checkpoint's weights load with
strict=True. forward ends in the sigmoid, as the package's ONNX weights do: all its weight formats give the
cell probability. Only the transposed-convolution upsampling is here (the OneFlow model's default); a
`bilinear=True` checkpoint has other weights and is refused by the export. Needs torch only; scriptable
with torch.jit.script.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Module):
    """(3x3 conv => BatchNorm => ReLU) * 2, 'same' padding, no conv bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max pool, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """2x2 transposed convolution (stride 2), pad to the skip connection, concatenate, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        dy = x2.shape[2] - x1.shape[2]
        dx = x2.shape[3] - x1.shape[3]
        if dy != 0 or dx != 0:  # odd sizes lose a pixel in max pooling
            x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    """Four poolings: height and width multiples of 16. Gives sigmoid(logits), the cell probability."""

    def __init__(self, n_channels: int = 1, n_classes: int = 1, width: int = 64):
        super().__init__()
        w = width
        self.inc = DoubleConv(n_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 16 * w)
        self.up1 = Up(16 * w, 8 * w)
        self.up2 = Up(8 * w, 4 * w)
        self.up3 = Up(4 * w, 2 * w)
        self.up4 = Up(2 * w, w)
        self.outc = OutConv(w, n_classes)

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
        return torch.sigmoid(self.outc(x))
