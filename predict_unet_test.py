"""Predict membrane masks for a folder of EM slices, or a TIFF stack, with a trained checkpoint.

    python3 predict_unet_test.py --checkpoint checkpoints/best --Test_Data_path data/test --save_res_path results
    python3 predict_unet_test.py --Test_Data_path test-volume.tif --save_res_path results_stack   # the challenge's
    python3 predict_unet_test.py --tta                      # + average over the 8 flips/rotations (8x slower)
    python3 predict_unet_test.py --tile 256 --overlap 64    # overlap-tile inference, for any image size
    python3 predict_unet_test.py --Test_Data_path data/train/image --label_path data/train/label   # + scores
    python3 predict_unet_test.py --checkpoint runs/seed0/last runs/seed1/last runs/seed2/last   # an ensemble
    python3 predict_unet_test.py --checkpoint unet.onnx     # ONNX Runtime (export_onnx.py writes unet.onnx)
    python3 predict_unet_test.py --checkpoint unet.onnx checkpoints/last --tta   # ONNX and OneFlow, averaged

For every input NAME.png it writes save_res_path/NAME.png, the binary mask in the label convention
(255 = cell, 0 = membrane), and save_res_path/prob/NAME.png, the cell probability x 255 (uint8); when
all slices share one size, also save_res_path/submission.tif, the ISBI 2012 submission stack (32-bit
float cell probabilities, 0 = membrane). A stack's slices are named by page (0.png, 1.png, ...), and
its masks and probabilities also go to save_res_path/mask.tif and prob.tif (uint8, page order).
With --label_path (a folder, or a stack) it prints V_rand, V_info and pixel error
per slice and for the stack (metrics.py). The model is rebuilt from the checkpoint alone; given several
checkpoints, their cell probabilities are averaged (an ensemble, e.g. of runs with different --seed).
A path ending in .onnx (export_onnx.py), or a bioimage.io package .zip made by export_onnx.py --bioimageio,
runs in ONNX Runtime instead of OneFlow, several times faster on a CPU (docs/deploy.md), at any image size
(an .onnx file exported with a fixed input size tiles other sizes at it, and one line says so).
save_res_path/run.json records the checkpoint, the settings and the versions, device and code commit
that produced the masks.
"""

from isbi_unet.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C inside `import oneflow`: one line, exit 130 (isbi_unet/interrupt.py)

import argparse
import multiprocessing
import os
import signal
import time

import numpy as np
import oneflow as flow

from isbi_unet.checkpoint import load_model
from isbi_unet.device import default_processes, select_device
from isbi_unet.engine import InferenceGraphs
from isbi_unet.errors import DataError, check_apart, check_flags, check_output_dir, make_output_dir, run_main
from isbi_unet.images import preprocess, read_label, read_slice, slice_names, slice_path, write_png
from isbi_unet.metrics import print_scores
from isbi_unet.onnx_backend import fixed_tile, is_onnx, load_onnx, onnx_forward
from isbi_unet.record import write_json_record
from isbi_unet.stacks import is_stack, write_stack
from isbi_unet.tiling import POOL, check_tiling, predict_tiled, write_isbi_tiff


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=["checkpoints/best"],
        help="checkpoint directory written by TrainUnetDataSet.py, or an .onnx file or bioimage.io .zip written by "
        "export_onnx.py (run by ONNX Runtime); several: average their probabilities",
    )
    p.add_argument(
        "--Test_Data_path",
        "--test-data-path",
        default="data/test",
        help="folder of images, or a multi-page TIFF stack, to segment",
    )
    p.add_argument(
        "--save_res_path",
        "--save-res-path",
        default="results",
        help="output folder for masks (and prob/ for probabilities)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="cell probability at or above which a pixel is cell")
    p.add_argument(
        "--tile",
        type=int,
        default=0,
        help="side of overlapping square tiles, a multiple of 16; 0 = whole image in one pass "
        "(with .onnx models: their export size wherever an image needs it)",
    )
    p.add_argument("--overlap", type=int, default=64, help="pixels shared by neighbouring tiles (with --tile)")
    p.add_argument(
        "--tta", action="store_true", help="average the probabilities over the 8 flips/rotations of the square"
    )
    p.add_argument(
        "--graph", action="store_true", help="run the model through nn.Graph (one compiled graph per input shape)"
    )
    p.add_argument(
        "--label_path", "--label-path", help="labels with the input file names: print ISBI scores of the predictions"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers",
        type=int,
        help="processes sharing the slices (default: 1 on CUDA or with only .onnx models, whose ONNX Runtime "
        "uses every core itself; else one per CPU core, at most 4)",
    )
    return p.parse_args(argv)


def probability_fn(models, device, graph=False):
    """numpy Nx1xhxw float32 -> cell probabilities of the same shape (the mean over `models`), for predict_tiled."""
    runs = [InferenceGraphs(m) if graph else m for m in models]

    def forward(batch):
        with flow.no_grad():
            x = flow.tensor(batch, device=device)
            return (sum(flow.sigmoid(run(x)) for run in runs) / len(runs)).numpy()

    return forward


def ensemble_fn(checkpoints, models, device, graph=False):
    """numpy forward averaging every model: OneFlow ones through probability_fn, .onnx ones in ONNX Runtime."""
    pairs = list(zip(checkpoints, models))
    forwards = [onnx_forward(m) for c, m in pairs if is_onnx(c)]
    weights = [1] * len(forwards)
    flow_models = [m for c, m in pairs if not is_onnx(c)]
    if flow_models:  # a OneFlow-only run stays exactly the single probability_fn it always was
        forwards.append(probability_fn(flow_models, device, graph))
        weights.append(len(flow_models))
    if len(forwards) == 1:
        return forwards[0]
    return lambda batch: sum(w * f(batch) for w, f in zip(weights, forwards)) / len(checkpoints)


def load_state(path, device, threads=None):
    """(model, checkpoint dict): a OneFlow UNet or an ONNX Runtime session, checked; .onnx dicts hold input_size."""
    return load_onnx(path, threads) if is_onnx(path) else load_model(path, device)


def onnx_size(states, tile):
    """The input size shared by the .onnx models (None without any); a --tile that does not fit is refused."""
    sizes = sorted({s["input_size"] for s in states if "input_size" in s})
    if len(sizes) > 1:
        raise DataError(f"the .onnx models take different input sizes {sizes}; export them at one --size")
    if sizes:
        fixed_tile((sizes[0], sizes[0]), sizes[0], tile)
    return sizes[0] if sizes else None


def say_tiling(images, size):
    """The one line saying which images an .onnx model's fixed input size makes tiled."""
    tiled = [im.shape for im in images if fixed_tile(im.shape, size)]
    if tiled:
        print(
            f"{len(tiled)} of {len(images)} images (e.g. {tiled[0][1]}x{tiled[0][0]}) differ from the ONNX "
            f"export's {size}x{size}: overlap-tile inference at {size}",
            flush=True,
        )


def predict_probability(forward, image, tile=0, overlap=64, tta=False):
    """Cell probability (HxW float32 in [0, 1]) for one uint8 slice."""
    return predict_tiled(forward, preprocess(image), tile=tile, overlap=overlap, tta=tta)[0]


def read_labels(label_path, names, images):
    """The label of every input slice (same name, or same page), checked like training labels."""
    present = set(slice_names(label_path))
    for name in names:
        if name not in present:
            raise DataError(f"{slice_path(label_path, name)}: no label for {name}")
    return [read_label(label_path, name, image.shape) for name, image in zip(names, images)]


def read_inputs(args):
    """(names, output file names, images, labels or None), every one checked before any work."""
    names = slice_names(args.Test_Data_path)
    out_names = output_names(args.Test_Data_path, names)
    images = [read_slice(args.Test_Data_path, n) for n in names]
    small = [n for n, im in zip(names, images) if min(im.shape) < 16]
    if small:
        raise DataError(
            f"{slice_path(args.Test_Data_path, small[0])}: smaller than 16 pixels, too small for four poolings"
        )
    labels = read_labels(args.label_path, names, images) if args.label_path else None
    return names, out_names, images, labels


def write_stacks(args, probs):
    """A stack in gives stacks out: the submission TIFF, and for a stack input also mask.tif and prob.tif."""
    if len({p.shape for p in probs}) != 1:
        return
    write_isbi_tiff(os.path.join(args.save_res_path, "submission.tif"), probs)
    if is_stack(args.Test_Data_path):
        write_stack(os.path.join(args.save_res_path, "prob.tif"), [to_png_prob(p) for p in probs])
        write_stack(os.path.join(args.save_res_path, "mask.tif"), [to_mask(p, args.threshold) for p in probs])


def to_png_prob(prob):
    return np.round(prob * 255).astype(np.uint8)


def to_mask(prob, threshold):
    return np.where(prob >= threshold, 255, 0).astype(np.uint8)


_worker = {}


def init_worker(checkpoints, device_name, graph, tile, overlap, tta, size=None, threads=None, models=None):
    """Runs once in each worker process: its own models (or the caller's), and the settings every slice shares."""
    device = flow.device(device_name)
    if models is None:
        models = [load_state(c, device, threads)[0] for c in checkpoints]
    forward = ensemble_fn(checkpoints, models, device, graph)
    _worker.update(forward=forward, tile=tile, overlap=overlap, tta=tta, size=size)


def init_pool_worker(*settings):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent ends the pool
    init_worker(*settings)


def predict_in_worker(image):
    w = _worker
    tile, overlap = w["tile"], w["overlap"]
    if w["size"]:  # .onnx models take one input size: tiles of it, unless the whole image fits
        tile = fixed_tile(image.shape, w["size"], tile)
        overlap = min(overlap, tile - POOL) if tile else overlap
    return predict_probability(w["forward"], image, tile, overlap, w["tta"])


def onnx_threads(workers):
    """ONNX Runtime's threads per process: the cores, shared out among the workers."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def predict_all(args, images, device, size=None, models=None):
    """Cell probabilities of every image, in order, from --workers processes (or this one, with `models`)."""
    settings = (args.checkpoint, str(device), args.graph, args.tile, args.overlap, args.tta, size)
    if args.workers == 1:
        init_worker(*settings, onnx_threads(1), models)
        yield from map(predict_in_worker, images)
        return
    # spawn, not fork: OneFlow's runtime threads do not survive a fork.
    spawn = multiprocessing.get_context("spawn")
    initargs = (*settings, onnx_threads(args.workers))
    with spawn.Pool(args.workers, initializer=init_pool_worker, initargs=initargs) as pool:
        yield from pool.imap(predict_in_worker, images)


def write_run_record(args, states, device):
    one = len(states) == 1  # a single checkpoint keeps scalar fields; an ensemble lists one entry per checkpoint
    epochs, configs = [s.get("epoch") for s in states], [s["model_config"] for s in states]
    record = {
        "args": {**vars(args), "checkpoint": args.checkpoint[0] if one else args.checkpoint},
        "checkpoint_epoch": epochs[0] if one else epochs,
        "model_config": configs[0] if one else configs,
    }
    write_json_record(os.path.join(args.save_res_path, "run.json"), record, device)


def output_names(folder, names):
    """NAME.png for each input; two inputs that would share one output name are refused."""
    outputs = {}
    for name in names:
        out = os.path.splitext(name)[0] + ".png"
        if out in outputs:
            raise DataError(f"{folder}: {outputs[out]} and {name} would both be written as {out}; rename one")
        outputs[out] = name
    return list(outputs)


def check_outputs(args):
    """--save_res_path can be made and written, and lies apart from every input."""
    if not 0.0 < args.threshold < 1.0:
        raise DataError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    inputs = [(args.Test_Data_path, "--Test_Data_path"), (args.label_path, "--label_path")]
    check_apart(args.save_res_path, "--save_res_path", inputs + [(c, "--checkpoint") for c in args.checkpoint])
    check_output_dir(args.save_res_path, "--save_res_path")


def main(argv=None):
    keyboard_interrupts()
    args = parse_args(argv)
    check_outputs(args)
    device = select_device(args.device)
    names, out_names, images, labels = read_inputs(args)
    check_tiling(args.tile, args.overlap, 1)
    if args.workers is None:
        one = device.type == "cuda" or all(map(is_onnx, args.checkpoint))  # ONNX Runtime threads over the cores
        args.workers = default_processes(one, limit=len(images))
    check_flags(args, positive=("workers",))
    # loaded and checked here, so a bad one fails before any output
    models, states = zip(*(load_state(c, device, onnx_threads(args.workers)) for c in args.checkpoint))
    if args.workers > 1:
        models = None  # worker processes load their own; these are let go
    size = onnx_size(states, args.tile)
    prob_dir = os.path.join(args.save_res_path, "prob")
    make_output_dir(prob_dir, "--save_res_path")

    t0 = time.time()
    if size and not args.tile:
        say_tiling(images, size)
    probs = []
    for out_name, prob in zip(out_names, predict_all(args, images, device, size, models)):
        probs.append(prob)
        write_png(os.path.join(prob_dir, out_name), to_png_prob(prob))
        write_png(os.path.join(args.save_res_path, out_name), to_mask(prob, args.threshold))
    seconds = time.time() - t0
    write_stacks(args, probs)
    write_run_record(args, states, device)
    model = (
        f"UNet{states[0]['model_config']}, epoch {states[0].get('epoch')}"
        if len(states) == 1
        else f"mean of {len(states)} checkpoints, epochs {', '.join(str(s.get('epoch')) for s in states)}"
    )
    print(
        f"{len(names)} masks in {args.save_res_path}/, probabilities in {prob_dir}/ "
        f"({model}, {seconds:.1f}s on {device} x {args.workers} process(es)"
        f"{', tiles ' + str(args.tile) if args.tile else ''}{', TTA' if args.tta else ''}"
        f"{', graph' if args.graph else ''}{', ONNX Runtime' if any(map(is_onnx, args.checkpoint)) else ''})"
    )
    if labels is not None:
        print_scores(names, probs, labels)


if __name__ == "__main__":
    run_main(main)
