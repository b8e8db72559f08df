"""Pictures of a prediction: the membrane map over the EM slice, and a side-by-side figure.

    python3 visualize.py --res_path results                    # after predict_unet_test.py (test.sh runs both)
    python3 visualize.py --res_path results --image_path data/test --n 5
    python3 visualize.py --res_path results_val --image_path VAL_IMAGES --label_path data/train/label

Reads res_path/NAME.png (mask, 255 = cell) and res_path/prob/NAME.png (cell probability x 255), as
predict_unet_test.py writes them, for the first --n images of --image_path (default: the folder named in
res_path/run.json). Writes res_path/overlay/NAME.png, the slice with predicted membrane in magenta, and
res_path/figure.png, one row per slice: image | probability | mask | overlay, or with --label_path
image | label | prediction (with its pixel error) | overlay. overlay.json lists what it wrote, with sizes and
digests: a rerun replaces only those (docs/details.md, "What a script may write").

The pictures in docs/ come from one command, given a training run's checkpoint folder:

    bash tools/make_docs.sh checkpoints
"""

from isbi_unet.process.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C from here on: one line, exit 130, nothing half-written (isbi_unet/process/interrupt.py)


import json
import os

import cv2

from isbi_unet.errors import DataError, check_apart, check_output_dir
from isbi_unet.figures import overlay, plt, save_figure  # figures selects matplotlib's headless backend
from isbi_unet.flags import Parser
from isbi_unet.formats import OVERLAYS, PREDICTIONS
from isbi_unet.images import check_same_size, read_gray, read_label, read_slice, slice_names, write_png
from isbi_unet.metrics import pixel_error
from isbi_unet.outputs import check_finished, claim, claim_file
from isbi_unet.process import run_main
from isbi_unet.stacks import is_stack


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument(
        "--res_path",
        default="results",
        help="predict_unet_test.py's output folder (NAME.png, prob/NAME.png)",
    )
    p.add_argument(
        "--image_path",
        help="the EM slices that were segmented (default: Test_Data_path in res_path/run.json)",
    )
    p.add_argument("--label_path", help="labels of those slices (255 = cell), to show and score against")
    p.add_argument("--n", type=int, default=3, bounds=(1, 10**5), help="how many slices, first in natural order")
    p.add_argument("--overlay_dir", help="where overlays go (default: res_path/overlay)")
    p.add_argument("--figure", help="side-by-side figure PNG (default: res_path/figure.png)")
    p.add_argument(
        "--max_side",
        type=int,
        default=0,
        bounds=(0, 2**16),
        help="shrink overlays to at most this many pixels a side (0: full size)",
    )
    p.add_argument(
        "--dpi", type=int, default=100, bounds=(1, 1000), help="figure resolution: 100 gives 1200 pixels across"
    )
    p.add_argument(
        "--palette", action="store_true", help="save the figure with 256 colours: less than half the bytes (docs/)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --overlay_dir, or over a --figure, that this script did not write",
    )
    return p.parse_args(argv)


def image_path_from_run(res_path):
    """Test_Data_path in res_path/run.json; a relative one is relative to where that prediction ran (its cwd)."""
    path = os.path.join(res_path, PREDICTIONS)
    try:
        with open(path) as f:
            record = json.load(f)
        return os.path.join(record.get("cwd", ""), record["args"]["Test_Data_path"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: cannot tell which images were segmented ({type(e).__name__}); pass --image_path"
        ) from None


def read_same_size(path, shape):
    return check_same_size(read_gray(path), path, shape)


def load_slice(args, name):
    """(image, probability, mask, label or None) as uint8 arrays for image file `name`."""
    image = read_slice(args.image_path, name)
    out_name = os.path.splitext(name)[0] + ".png"
    prob = read_same_size(os.path.join(args.res_path, "prob", out_name), image.shape)
    mask = read_same_size(os.path.join(args.res_path, out_name), image.shape)
    label = None
    if args.label_path:
        label_name = name if is_stack(args.label_path) else out_name  # a stack's pages, or the mask's file name
        label = read_label(args.label_path, label_name, image.shape)
    return image, prob, mask, label


def shrink(array, max_side):
    scale = max_side / max(array.shape[:2]) if max_side else 1.0
    if scale >= 1.0:
        return array
    size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


def draw_figure(rows, labelled, out, dpi=100, palette=False):
    """rows: (name, image, prob, mask, label, overlay) per slice; one figure row each."""
    titles = ["image", "label", "prediction", "overlay"] if labelled else ["image", "probability", "mask", "overlay"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3.1 * len(rows)), dpi=dpi, squeeze=False)
    for ax_row, (name, image, prob, mask, label, over) in zip(axes, rows):
        panels = [image, label, mask, over] if labelled else [image, prob, mask, over]
        for ax, title, panel in zip(ax_row, titles, panels):
            if title == "prediction":
                title = f"prediction (pixel error {pixel_error(mask / 255.0, label):.3f})"
            if panel.ndim == 3:
                ax.imshow(cv2.cvtColor(panel, cv2.COLOR_BGR2RGB))
            else:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name}: {title}" if title == titles[0] else title, fontsize=10)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out, "figure", palette)


def check_outputs(args, overlay_dir, figure):
    """Overlays and figure lie apart from the slices and labels, and never replace the masks they draw."""
    inputs = [(args.image_path, "--image_path"), (args.label_path, "--label_path")]
    check_apart(overlay_dir, "--overlay_dir", inputs)
    check_apart(figure, "--figure", inputs)
    for kept in (args.res_path, os.path.join(args.res_path, "prob")):
        if os.path.realpath(overlay_dir) == os.path.realpath(kept):
            raise DataError(f"{overlay_dir}: --overlay_dir is {kept}, whose masks it would overwrite; choose another")
    check_output_dir(overlay_dir, "--overlay_dir")
    check_output_dir(os.path.dirname(os.path.abspath(figure)), "--figure")


def main(argv=None):
    keyboard_interrupts()
    args = parse_args(argv)
    overlay_dir = args.overlay_dir or os.path.join(args.res_path, "overlay")
    figure = args.figure or os.path.join(args.res_path, "figure.png")
    check_finished(args.res_path, PREDICTIONS, "--res_path")
    args.image_path = args.image_path or image_path_from_run(args.res_path)
    check_outputs(args, overlay_dir, figure)
    inputs = [(args.image_path, "--image_path"), (args.label_path, "--label_path")]
    with claim(overlay_dir, "--overlay_dir", OVERLAYS, args.overwrite, inputs) as out:  # locked till the end
        claim_file(figure, "--figure", "figure", args.overwrite)  # checked under the lock, like the folder
        names = slice_names(args.image_path)[: args.n]
        slices = [(name, *load_slice(args, name)) for name in names]  # everything checked before writing
        written = [os.path.splitext(name)[0] + ".png" for name, *_ in slices]
        out.start(writes=written, res_path=args.res_path, image_path=args.image_path)  # the earlier overlays go
        rows = []
        for (name, image, prob, mask, label), out_name in zip(slices, written):
            over = overlay(image, mask)
            write_png(out.path(out_name), shrink(over, args.max_side))
            rows.append((name, image, prob, mask, label, over))
        draw_figure(rows, args.label_path is not None, figure, args.dpi, args.palette)
        out.add_beside(figure)
    print(f"{len(rows)} overlays in {overlay_dir}/, figure {figure}")


if __name__ == "__main__":
    run_main(main)
