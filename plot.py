"""Draw a training run's log to a PNG (headless): train/validation loss per epoch and, when the log
has them, the validation metrics (V_rand, V_info, pixel error) in a second panel.

    python3 plot.py                                   # reads checkpoints/log.csv, writes checkpoints/loss.png
    python3 plot.py --log checkpoints/log.csv --out loss.png
"""

from isbi_unet.process import start_up

if __name__ == "__main__":
    start_up()  # Ctrl-C from here on: one line, exit 130, nothing half-written (isbi_unet/process)

import os

from isbi_unet.errors import check_apart, check_output_dir
from isbi_unet.figures import plot_losses, read_log
from isbi_unet.flags import Parser
from isbi_unet.outputs import claim_file
from isbi_unet.process import run_main


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("--log", default="checkpoints/log.csv", help="log.csv written by TrainUnetDataSet.py")
    p.add_argument("--out", help="PNG to write (default: loss.png beside the log)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a loss plot drawn here")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.log) or ".", "loss.png")
    check_apart(out, "--out", [(args.log, "--log")])
    claim_file(out, "--out", "loss plot", args.overwrite)
    check_output_dir(os.path.dirname(out) or ".", "--out")
    plot_losses(read_log(args.log), out)
    print(out)


if __name__ == "__main__":
    run_main(main)
