"""U-Net (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597) in OneFlow: `from unet import UNet`.

The article's model, after milesial/Pytorch-UNet, with its `bilinear=True` channel mismatch fixed and a
`width` knob (channels of the first level; the paper uses 64). It lives in isbi_unet/model.py, which the
library uses; this file keeps the article's name for it.

    python3 unet.py                      # prints the parameter count and checks one forward pass
    python3 unet.py --width 16 --bilinear
"""

import oneflow as flow

from isbi_unet.flags import Parser
from isbi_unet.formats import POOL
from isbi_unet.model import DoubleConv, Down, OutConv, UNet, Up, UpConv2x2

__all__ = ["DoubleConv", "Down", "OutConv", "UNet", "Up", "UpConv2x2"]


def main():
    parser = Parser(__doc__)
    parser.add_argument(
        "--width", type=int, default=64, bounds=(1, 1024), help="channels of the first level (paper: 64)"
    )
    parser.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convs")
    parser.add_argument("--size", type=int, default=512, bounds=(POOL, 2**13), help="side of the square test input")
    args = parser.parse_args()
    net = UNet(1, 1, bilinear=args.bilinear, width=args.width)
    n_params = sum(p.numel() for p in net.parameters())
    net.eval()
    with flow.no_grad():
        y = net(flow.zeros(1, 1, args.size, args.size))
    print(f"UNet {net.config()}: {n_params:,} parameters, output {tuple(y.shape)}")


if __name__ == "__main__":
    main()
