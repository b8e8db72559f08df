"""ISBI 2012 slices as a OneFlow dataset: `SelfDataSet`, the article's name.

`SelfDataSet` pairs `image_dir/NAME.png` with `label_dir/NAME.png`, standardises each slice to zero mean
and unit variance (`preprocess`, which prediction shares), binarises labels (255 = cell -> 1,
0 = membrane -> 0) and augments as the U-Net paper does: elastic deformation, the 8 flips/rotations
of the square, mild intensity jitter, and optional random crops; optionally it also returns the
paper's border weight map for each sample. The logic is `isbi_unet.dataset.Slices` (NumPy only).

    python3 dataloader.py --data_path data/train     # checks the folder and prints what it found
"""

import numpy as np
import oneflow as flow

from isbi_unet import runtime
from isbi_unet.dataset import Slices
from isbi_unet.errors import DataError, run_main
from isbi_unet.flags import Parser
from isbi_unet.images import training_sources
from isbi_unet.tiling import POOL


class SelfDataSet(Slices, flow.utils.data.Dataset):
    """`Slices` as a flow.utils.data.Dataset, for DataLoader and DistributedSampler."""


def training_loader(train_set, batch_size, seed, where, graph=False, num_workers=0, pin_memory=False):
    """A DataLoader over this rank's share of `train_set` (DistributedSampler), shuffled per epoch.

    Refuses, naming the data folder `where`, whole slices of different sizes in one batch and an epoch without a batch.
    """
    check_whole_slices_batch(train_set, batch_size, graph, where)
    rank, _, world_size, _ = runtime.whoami()
    sampler = flow.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    side = train_set.crop_size or min(min(image.shape[1:]) for image in train_set.images)
    drop_last = drop_last_batch(len(sampler), batch_size, side, graph)
    loader = flow.utils.data.DataLoader(
        train_set, batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory
    )
    if len(loader) == 0:
        raise DataError(
            f"{where}: {len(train_set)} training sample(s) per epoch over all processes "
            f"give no full batch of --batch_size {batch_size}"
        )
    return loader


def drop_last_batch(samples, batch_size, side, graph):
    """Whether each epoch drops its short last batch: a graph is compiled for one batch shape, and one
    sample at a 1x1 bottleneck (sides below 2 * POOL) gives BatchNorm one value per channel, whose
    variance is no statistic (NaN running variance). Otherwise every sample trains."""
    return graph or (samples % batch_size == 1 and side < 2 * POOL)


def check_whole_slices_batch(train_set, batch_size, graph, where):
    """Whole slices of different sizes cannot share a batch, nor one compiled graph: say so before training."""
    sizes = sorted({image.shape[1:] for image in train_set.images})
    if train_set.crop_size or len(sizes) == 1 or (batch_size == 1 and not graph):
        return
    (h1, w1), (h2, w2) = sizes[0], sizes[-1]
    raise DataError(
        f"{where}: training slices differ in size ({w1}x{h1} ... {w2}x{h2}), so whole slices cannot "
        "be batched; train on crops (--crop_size N) or, in eager mode, with --batch_size 1"
    )


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
