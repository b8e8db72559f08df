"""How much context (halo) a block needs for its probabilities to equal the whole-image pass: the measurement
behind isbi_unet/blocks.py's HALO (docs/volumes.md).

    python3 tools/halo.py --checkpoint unet.onnx --images data/test/0.png data/test/1.png --side 128

For each halo, every slice is predicted block by block (cores of --side px, windows grown by the halo and
standardised with the whole slice's statistics, as isbi_unet/volume.py does) and compared with the whole-image
pass: the largest absolute difference of the cell probabilities, over all pixels and inside (away from the
image border by the halo), and how many pixels differ by more than 1/255 and at all.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from isbi_unet.blocks import exact_stats, plan_blocks, read_padded, read_window, standardise  # noqa: E402
from isbi_unet.flags import Parser  # noqa: E402
from isbi_unet.images import read_gray  # noqa: E402
from isbi_unet.predictor import Predictor, Spec  # noqa: E402


def blockwise(predictor, image, side, halo):
    stats, out = exact_stats(image), np.zeros(image.shape, np.float32)
    for b in plan_blocks(image.shape, side):
        window, (cy, cx) = read_window(b, image.shape, halo)
        x = standardise(read_padded(lambda ys, xs: image[ys, xs], window, image.shape), stats)
        h, w = b.y1 - b.y0, b.x1 - b.x0
        out[b.y0 : b.y1, b.x0 : b.x1] = predictor.window(x)[cy : cy + h, cx : cx + w]
    return out


def main():
    p = Parser(__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--side", type=int, default=128, help="block core side")
    p.add_argument("--halos", nargs="+", type=int, default=[32, 48, 64, 80, 96])
    args = p.parse_args()
    predictor = Predictor.open(Spec((args.checkpoint,)))
    images = [read_gray(path) for path in args.images]
    wholes = [predictor(image) for image in images]
    print(f"{'halo':>5}{'max diff':>12}{'inside':>12}{'> 1/255':>10}{'differ':>10}")
    for halo in args.halos:
        worst = inside = 0.0
        over = differ = 0
        for image, whole in zip(images, wholes):
            diff = np.abs(blockwise(predictor, image, args.side, halo) - whole)
            worst, over = max(worst, float(diff.max())), over + int((diff > 1 / 255).sum())
            differ += int(np.count_nonzero(diff))
            inside = max(inside, float(diff[halo:-halo, halo:-halo].max()))
        print(f"{halo:>5}{worst:>12.2e}{inside:>12.2e}{over:>10}{differ:>10}")


if __name__ == "__main__":
    main()
