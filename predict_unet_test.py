"""Predict membrane masks for a folder of EM slices, or a TIFF stack, with a trained checkpoint.

    python3 predict_unet_test.py --checkpoint checkpoints/best --Test_Data_path data/test --save_res_path results
    python3 predict_unet_test.py --Test_Data_path test-volume.tif --save_res_path results_stack   # the challenge's
    python3 predict_unet_test.py --tta                      # + average over the 8 flips/rotations (8x slower)
    python3 predict_unet_test.py --tile 256 --overlap 64    # overlap-tile inference, for any image size
    python3 predict_unet_test.py --Test_Data_path data/train/image --label_path data/train/label   # + scores
    python3 predict_unet_test.py --checkpoint runs/seed0/last runs/seed1/last runs/seed2/last   # an ensemble
    python3 predict_unet_test.py --checkpoint unet.onnx     # ONNX Runtime (export_onnx.py writes unet.onnx)
    python3 predict_unet_test.py --checkpoint unet.onnx checkpoints/last --tta   # ONNX and OneFlow, averaged

For every input NAME it writes save_res_path/NAME.png, the mask (255 = cell, 0 = membrane, as labels),
and prob/NAME.png, the cell probability x 255; when all slices share one size, also submission.tif, the
ISBI 2012 submission (32-bit float cell probabilities); for a stack in, mask.tif and prob.tif too (pages
named 0, 1, ...). With --label_path it prints V_rand, V_info and pixel error per slice and for the stack.
Several checkpoints are an ensemble (their probabilities averaged). An .onnx file (export_onnx.py) or a
bioimage.io package .zip (export_onnx.py --bioimageio) runs in ONNX Runtime, several times faster on a CPU.
run.json records the model, the settings, versions and code commit, and each result file with its size
and digest: a later run into the same folder replaces those still as written, as a whole; a folder holding
anything else (a file changed since) is refused, and kept as it is (docs/details.md, "What a script may write").
"""

from isbi_unet.process.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C inside `import oneflow`: one line, exit 130 (isbi_unet/process/interrupt.py)

import os
import time

import numpy as np
import oneflow  # noqa: F401  imported under the start-up guard, before keyboard_interrupts() replaces its handler

from isbi_unet.device import default_processes, select_device
from isbi_unet.errors import DataError, check_apart, check_flags, check_output_dir, make_output_dir, warn
from isbi_unet.flags import Parser
from isbi_unet.formats import PREDICTIONS
from isbi_unet.images import read_to_segment, write_png
from isbi_unet.metrics import print_scores
from isbi_unet.outputs import claim
from isbi_unet.predictor import Predictor, Spec, predict_all, threads_per_process, uses_every_core
from isbi_unet.process import run_main
from isbi_unet.record import run_record
from isbi_unet.stacks import is_stack, write_stack
from isbi_unet.tiling import check_tiling, write_isbi_tiff

STACKS = ("prob.tif", "mask.tif")


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=["checkpoints/best"],
        help="checkpoint directory written by TrainUnetDataSet.py, or an .onnx file or bioimage.io .zip written by "
        "export_onnx.py (run by ONNX Runtime); several: average their probabilities",
    )
    p.add_argument(
        "--Test_Data_path",
        "--test-data-path",  # the article's capitals: the parser derives kebab spellings in their own case only
        default="data/test",
        help="folder of images, or a multi-page TIFF stack, to segment",
    )
    p.add_argument("--save_res_path", default="results", help="output folder for masks (and prob/ for probabilities)")
    p.add_argument("--threshold", type=float, default=0.5, help="cell probability at or above which a pixel is cell")
    p.add_argument(
        "--tile",
        type=int,
        default=0,
        help="side of overlapping square tiles, a multiple of 16; 0 = whole image in one pass "
        "(with .onnx models: their export size wherever an image needs it)",
    )
    p.add_argument("--overlap", type=int, default=64, help="pixels shared by neighbouring tiles (with --tile)")
    p.add_argument("--tta", action="store_true", help="average the probabilities over the 8 flips/rotations")
    p.add_argument("--graph", action="store_true", help="run the model through nn.Graph, one per input shape")
    p.add_argument("--label_path", help="labels with the input file names: print ISBI scores of the predictions")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers",
        type=int,
        help="processes sharing the slices (default: 1 on CUDA or with only .onnx models, whose ONNX Runtime "
        "uses every core itself; else one per CPU core, at most 4)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a --save_res_path that holds files this script did not write (its own earlier output "
        "is always replaced as a whole)",
    )
    return p.parse_args(argv)


def check_outputs(args):
    """--save_res_path can be made and written, lies apart from every input, and holds nothing of anyone else's."""
    if not 0.0 < args.threshold < 1.0:
        raise DataError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    inputs = [(args.Test_Data_path, "--Test_Data_path"), (args.label_path, "--label_path")]
    check_apart(args.save_res_path, "--save_res_path", inputs + [(c, "--checkpoint") for c in args.checkpoint])
    check_output_dir(args.save_res_path, "--save_res_path")


def open_predictor(args, device, n_images):
    """Every --checkpoint loaded and checked here, so a bad one fails before any output; --workers defaulted."""
    if args.workers is None:
        one = device.type == "cuda" or uses_every_core(args.checkpoint)
        args.workers = default_processes(one, limit=n_images)
    check_flags(args, positive=("workers",))
    cores = len(os.sched_getaffinity(0))
    if args.workers > cores:  # more processes than cores only share them, each with its copy of the model
        warn(f"--workers {args.workers} is more than the {cores} CPU cores here; using {cores}")
        args.workers = cores
    settings = (args.graph, args.tile, args.overlap, args.tta, threads_per_process(args.workers))
    return Predictor.open(Spec(tuple(args.checkpoint), str(device), *settings))


def to_png_prob(prob):
    return np.round(prob * 255).astype(np.uint8)


def to_mask(prob, threshold):
    return np.where(prob >= threshold, 255, 0).astype(np.uint8)


def write_maps(args, out_names, probs):
    """Writes each mask and probability PNG as its map arrives; returns the maps, in order."""
    kept = []
    for out_name, prob in zip(out_names, probs):
        kept.append(prob)
        write_png(os.path.join(args.save_res_path, "prob", out_name), to_png_prob(prob))
        write_png(os.path.join(args.save_res_path, out_name), to_mask(prob, args.threshold))
    return kept


def write_stacks(args, probs):
    """A stack in gives stacks out: the submission TIFF, and for a stack input also mask.tif and prob.tif."""
    if len({p.shape for p in probs}) != 1:
        return
    write_isbi_tiff(os.path.join(args.save_res_path, "submission.tif"), probs)
    if is_stack(args.Test_Data_path):
        prob_tif, mask_tif = (os.path.join(args.save_res_path, name) for name in STACKS)
        write_stack(prob_tif, [to_png_prob(p) for p in probs])
        write_stack(mask_tif, [to_mask(p, args.threshold) for p in probs])


def main(argv=None):
    keyboard_interrupts()
    args = parse_args(argv)
    inputs = [(args.Test_Data_path, "--Test_Data_path"), (args.label_path, "--label_path")]
    inputs += [(c, "--checkpoint") for c in args.checkpoint]
    with claim(args.save_res_path, "--save_res_path", PREDICTIONS, args.overwrite, inputs) as out:  # locked
        segment(args, out)


def segment(args, out):
    check_outputs(args)
    device = select_device(args.device)
    names, out_names, images, labels = read_to_segment(args.Test_Data_path, args.label_path)
    check_tiling(args.tile, args.overlap, 1)
    predictor = open_predictor(args, device, len(images))
    outputs = [*out_names, *(f"prob/{name}" for name in out_names), "submission.tif"]
    outputs += STACKS if is_stack(args.Test_Data_path) else ()
    out.start(writes=outputs, args=vars(args))  # the earlier results go as a whole
    prob_dir = os.path.join(args.save_res_path, "prob")
    make_output_dir(prob_dir, "--save_res_path")

    t0 = time.time()
    note = predictor.tiling_note([im.shape for im in images])
    if note:
        print(note, flush=True)
    probs = write_maps(args, out_names, predict_all(predictor, images, args.workers))
    seconds = time.time() - t0
    write_stacks(args, probs)
    checkpoint = args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint  # as run.json always had
    out.finish(args={**vars(args), "checkpoint": checkpoint}, **predictor.record(), **run_record(device))
    print(
        f"{len(names)} masks in {args.save_res_path}/, probabilities in {prob_dir}/ ({predictor.describe()}, "
        f"{seconds:.1f}s on {device} x {args.workers} process(es){predictor.describe_settings()})"
    )
    if labels is not None:
        print_scores(names, probs, labels)


if __name__ == "__main__":
    run_main(main)
