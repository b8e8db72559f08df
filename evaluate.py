"""Score probability maps against labels with the ISBI 2012 metrics: V_rand, V_info and pixel error.

    python3 evaluate.py --prob_dir results/prob --label_dir data/train/label
    python3 evaluate.py --prob_dir runs/s0/prob runs/s1/prob runs/s2/prob --label_dir VAL/label   # an ensemble

Pairs `prob_dir/NAME.png` (cell probability x 255, as predict_unet_test.py writes it) with
`label_dir/NAME.png` (255 = cell, 0 = membrane) and prints V_rand, V_info (each with its best threshold)
and pixel error per slice and for the stack; given several prob_dirs, it scores the mean of their maps.
How the scores are computed: isbi_unet/metrics.py.
"""

from isbi_unet.process import start_up

if __name__ == "__main__":
    start_up()  # Ctrl-C from here on: one line, exit 130, nothing half-written (isbi_unet/process)


import os

import numpy as np

from isbi_unet.errors import DataError
from isbi_unet.flags import Parser
from isbi_unet.formats import PREDICTIONS
from isbi_unet.images import list_images, natural_key, read_gray, read_label, slice_names
from isbi_unet.metrics import print_scores
from isbi_unet.outputs import check_finished
from isbi_unet.process import run_main
from isbi_unet.stacks import is_stack


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument(
        "--prob_dir",
        nargs="+",
        required=True,
        help="cell probability x 255 PNGs (e.g. results/prob); several: score the mean of their maps",
    )
    p.add_argument(
        "--label_dir",
        required=True,
        help="labels with the same file names, or a label stack (page N scores N.png)",
    )
    return p.parse_args(argv)


def common_names(prob_dirs, label_dir):
    """Map names in the first prob_dir to their label's name (same file, or page N for N.png in a stack);
    every other prob_dir must have them all."""
    first = prob_dirs[0]
    probs = list_images(first)  # first, so a missing prob_dir is the error named
    labels = {label_key(n, label_dir): n for n in slice_names(label_dir)}
    names = {n: labels[label_key(n, label_dir)] for n in probs if label_key(n, label_dir) in labels}
    if not names:
        raise DataError(f"{first}: no image file names in common with {label_dir}")
    for prob_dir in prob_dirs[1:]:  # an ensemble scores the same slices from every member
        missing = sorted(set(names) - set(list_images(prob_dir)), key=natural_key)
        if missing:
            raise DataError(f"{os.path.join(prob_dir, missing[0])}: missing, but {first} has it")
    return names  # in list_images' natural order


def label_key(name, label_dir):
    return os.path.splitext(name)[0] if is_stack(label_dir) else name


def read_scored(prob_dirs, label_dir, name, label_name):
    """(mean cell probability in [0, 1], label) of one slice, checked as training checks labels."""
    label = read_label(label_dir, label_name)
    maps = [read_gray(os.path.join(prob_dir, name)) for prob_dir in prob_dirs]
    for prob_dir, prob in zip(prob_dirs, maps):
        if prob.shape != label.shape:
            raise DataError(f"{os.path.join(prob_dir, name)}: size {prob.shape} differs from its label's {label.shape}")
    return np.mean(maps, axis=0) / 255.0, label


def main(argv=None):
    args = parse_args(argv)
    for prob_dir in args.prob_dir:  # maps of a prediction that was stopped are not a run's
        check_finished(os.path.dirname(os.path.abspath(prob_dir)), PREDICTIONS, "--prob_dir")
    names = common_names(args.prob_dir, args.label_dir)
    probs, labels = zip(*(read_scored(args.prob_dir, args.label_dir, n, label) for n, label in names.items()))
    print_scores(list(names), probs, labels)


if __name__ == "__main__":
    run_main(main)
