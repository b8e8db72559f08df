"""ISBI 2012 slices as a OneFlow dataset: `SelfDataSet`, the article's name.

`SelfDataSet` pairs `image_dir/NAME.png` with `label_dir/NAME.png`, standardises each slice to zero mean
and unit variance (`preprocess`, which prediction shares), binarises labels (255 = cell -> 1,
0 = membrane -> 0) and augments as the U-Net paper does: elastic deformation, the 8 flips/rotations
of the square (the 4 that keep the shape of a non-square slice), mild intensity jitter, and optional
random crops; optionally it also returns the paper's border weight map for each sample. The logic is
`isbi_unet.dataset.Slices` (NumPy only).

    python3 dataloader.py --data_path data/train     # checks the folder and prints what it found
"""

import numpy as np
import oneflow as flow

from isbi_unet.dataset import Slices
from isbi_unet.flags import Parser
from isbi_unet.images import training_sources
from isbi_unet.process import run_main


class SelfDataSet(Slices, flow.utils.data.Dataset):
    """`Slices` as a flow.utils.data.Dataset, for DataLoader and DistributedSampler."""


def main():
    parser = Parser(__doc__)
    parser.add_argument(
        "--data_path",
        default="data/train",
        help="folder holding image/ and label/, or train-volume.tif and train-labels.tif",
    )
    args = parser.parse_args()
    ds = SelfDataSet(*training_sources(args.data_path))
    cell = np.mean([lab.mean() for lab in ds.labels])
    h, w = ds.images[0].shape[1:]
    print(f"{args.data_path}: {len(ds)} pairs, {w}x{h}, cell fraction {cell:.3f}")


if __name__ == "__main__":
    run_main(main)
