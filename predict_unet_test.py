"""Predict membrane masks for a folder of EM slices, or a TIFF stack, with a trained checkpoint.

    python3 predict_unet_test.py --checkpoint checkpoints/best --Test_Data_path data/test --save_res_path results
    python3 predict_unet_test.py --Test_Data_path test-volume.tif --save_res_path results_stack   # the challenge's
    python3 predict_unet_test.py --tta                      # + average over the 8 flips/rotations (8x slower)
    python3 predict_unet_test.py --max_memory 8             # GB for all processes (default 2.75): bigger blocks
    python3 predict_unet_test.py --Test_Data_path data/train/image --label_path data/train/label   # + scores
    python3 predict_unet_test.py --checkpoint runs/seed0/last runs/seed1/last runs/seed2/last   # an ensemble
    python3 predict_unet_test.py --checkpoint unet.onnx     # ONNX Runtime (export_onnx.py writes unet.onnx)
    python3 predict_unet_test.py --checkpoint unet.onnx checkpoints/last --tta   # ONNX and OneFlow, averaged

For every input NAME it writes save_res_path/NAME.png, the mask (255 = cell, 0 = membrane, as labels),
and prob/NAME.png, the cell probability x 255; when all slices share one size, also submission.tif, the
ISBI 2012 submission (32-bit float cell probabilities); for a stack in, mask.tif and prob.tif too (pages
named 0, 1, ...), written block by block; slices over 8192x8192 get only the TIFF stacks. Any size runs in
blocks chosen from --max_memory (or --tile), each with the context the model needs, standardised with its
whole slice's statistics: the same probabilities as one whole-image pass (isbi_unet/volume.py). A stopped run
continues where it stopped when the same command is run again. With --label_path it prints V_rand, V_info
and pixel error per slice and for the stack. Several checkpoints are an ensemble (their probabilities
averaged). An .onnx file (export_onnx.py) or a bioimage.io package .zip (export_onnx.py --bioimageio) runs in
ONNX Runtime; so does a checkpoint on a CPU (converted as it loads: the same probabilities within 1e-6, several
times faster and leaner than OneFlow's CPU kernels), unless --engine oneflow.
run.json records the model, the settings, versions and code commit, and which files are the results: a
later run into the same folder replaces them as a whole; a folder holding anything else is refused.
"""

from isbi_unet.process.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C inside `import oneflow`: one line, exit 130 (isbi_unet/process/interrupt.py)

import functools
import os
import time

import oneflow  # noqa: F401  imported under the start-up guard, before keyboard_interrupts() replaces its handler

from isbi_unet.blocks import padded_shape, plan_blocks
from isbi_unet.device import default_processes, select_device
from isbi_unet.errors import DataError, make_output_dir, warn
from isbi_unet.flags import Above, Below, Parser
from isbi_unet.formats import PREDICTIONS
from isbi_unet.images import output_names, read_label, slice_names, slice_path
from isbi_unet.metrics import print_scores
from isbi_unet.outputs import claim
from isbi_unet.predictor import AUTO, CHOICES, Spec, threads_per_process, uses_every_core, worker_predictor
from isbi_unet.process import run_main
from isbi_unet.record import run_record
from isbi_unet.tiling import check_tiling
from isbi_unet.volume import (
    HALO,
    PROB_DIR,
    ArraySink,
    begin_output,
    check_sizes,
    choose_side,
    end_output,
    fingerprint,
    make_executor,
    make_sinks,
    open_source,
    plan_volume,
    planned_outputs,
    run_blocks,
    windows_in_flight,
)


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
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        bounds=(Above(0), Below(1)),
        help="cell probability at or above which a pixel is cell",
    )
    p.add_argument(
        "--max_memory",
        type=float,
        default=2.75,
        bounds=(Above(0), 4096),
        help="GB that prediction may use, all processes together: the block size is chosen from it",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=0,
        bounds=(0, 1 << 20),
        help="side of the blocks predicted at once (each with %d px of context), a multiple of 16, checked against "
        "--max_memory; 0 = the largest --max_memory allows (a whole slice where it fits)" % HALO,
    )
    p.add_argument(
        "--overlap", type=int, bounds=(0, 1 << 20), help="obsolete: blocks overlap by the context the model needs"
    )
    p.add_argument("--tta", action="store_true", help="average the probabilities over the 8 flips/rotations")
    p.add_argument("--graph", action="store_true", help="run the model through nn.Graph, one per input shape")
    p.add_argument("--label_path", help="labels with the input file names: print ISBI scores of the predictions")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers",
        type=int,
        bounds=(1, 4096),  # more than the cores is capped to them, with a warning
        help="processes sharing the blocks (default: 1 on CUDA, and where ONNX Runtime or OpenVINO runs every model, "
        "using every core itself, as on a CPU by default; else, --engine oneflow, one per CPU core, at most 4)",
    )
    p.add_argument(
        "--engine",
        choices=CHOICES,
        default=AUTO,
        help="what runs the models: auto = ONNX Runtime on a CPU (checkpoints converted as they load), OneFlow on "
        "a GPU or with --graph; oneflow (checkpoints; .onnx files still run in ONNX Runtime); onnxruntime; "
        "openvino, in f32 (the same probabilities within 1e-6); openvino-bf16 (faster on CPUs with AVX512-BF16, "
        "probabilities moved by up to about 0.01): docs/volumes.md#engines",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a Dask scheduler's address, tcp://HOST:PORT: its workers run the blocks (docs/volumes.md); the model "
        "must be at the same absolute path on every worker",
    )
    p.add_argument(
        "--scheduler_timeout",
        type=float,
        default=30.0,
        bounds=(Above(0), 86400),
        help="seconds to wait for the --scheduler to answer, for a first worker, and for one after all are lost",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a --save_res_path that holds files this script did not write (its own earlier output "
        "is always replaced as a whole; a stopped run of the same command is continued)",
    )
    return p.parse_args(argv)


def read_labels(label_path, source, shapes):
    """The label of every input slice (same name, or same page), checked like training labels, before any work."""
    present = set(slice_names(label_path))
    for name in source.names:
        if name not in present:
            raise DataError(f"{slice_path(label_path, name)}: no label for {name}")
    return [read_label(label_path, name, shape) for name, shape in zip(source.names, shapes)]


def open_predictor(args, device, shapes):
    """Every --checkpoint loaded and checked here, so a bad one fails before any output; --workers defaulted;
    the block side chosen. Returns (predictor, spec, side)."""
    check_tiling(args.tile, 0, 1)
    one = device.type == "cuda" or uses_every_core(args.checkpoint, args.engine, device, args.graph)
    # On a cluster, this process only reads and writes: --max_memory is then each worker process's budget.
    if args.scheduler and args.workers:
        warn(f"--workers {args.workers} is not used with --scheduler: the cluster's workers run the blocks")
    workers = 1 if args.scheduler else args.workers or default_processes(one)
    cores = len(os.sched_getaffinity(0))
    if workers > cores:  # more processes than cores only share them, each with its copy of the model
        warn(f"--workers {workers} is more than the {cores} CPU cores here; using {cores}")
        workers = cores
    spec = Spec(
        tuple(args.checkpoint), str(device), args.graph, 0, 64, args.tta, threads_per_process(workers), args.engine
    )
    predictor = worker_predictor(spec)  # this process's; with one worker, the one that predicts
    for path, backend in zip(args.checkpoint, predictor.backends):
        if getattr(backend, "fallback", None):
            warn(f"{path} runs in OneFlow: {backend.fallback}")
    if predictor.size:  # a fixed-size ONNX export: a whole slice per block, tiled at its size as before
        spec = spec._replace(tile=args.tile, overlap=args.overlap or 64)
        worker_predictor.cache_clear()
        predictor = worker_predictor(spec)
        return predictor, spec, workers, max(max(padded_shape(s)) for s in shapes)
    if args.overlap is not None:  # kept for fixed-size ONNX exports, which tile as before
        warn(f"--overlap is obsolete and ignored: blocks overlap by the {HALO} px of context the model needs")
    width = max(c.get("width", 64) for c in (s["model_config"] for s in predictor.states))
    side = choose_side(args.max_memory, args.tile, workers, predictor.runtimes, width, args.tta, shapes)
    if args.workers is None:  # no more processes than blocks
        workers = max(1, min(workers, sum(len(plan_blocks(s, side)) for s in shapes)))
    return predictor, spec, workers, side


def main(argv=None):
    keyboard_interrupts()
    args = parse_args(argv)
    inputs = [(args.Test_Data_path, "--Test_Data_path"), (args.label_path, "--label_path")]
    inputs += [(c, "--checkpoint") for c in args.checkpoint]
    with claim(args.save_res_path, "--save_res_path", PREDICTIONS, args.overwrite, inputs) as out:  # locked
        segment(args, out)


def segment(args, out):
    """main() once --save_res_path is this run's: every input read and checked, then the blocks predicted."""
    device = select_device(args.device)
    source = open_source(args.Test_Data_path)
    out_names = output_names(args.Test_Data_path, source.names)
    shapes = check_sizes(source)
    labels = read_labels(args.label_path, source, shapes) if args.label_path else None
    predictor, spec, workers, side = open_predictor(args, device, shapes)
    args.workers = workers
    executor = make_executor(workers, args.scheduler, args.scheduler_timeout)  # a cluster that fails: before output
    if args.scheduler:
        spec = on_cluster(spec)
    blocks = plan_volume(source, side)
    outputs = planned_outputs(source, out_names, shapes)
    settings = {k: getattr(args, k) for k in ("threshold", "tta", "graph", "device", "engine")}
    print_line = functools.partial(print, flush=True)
    journal, resumed = begin_output(
        out,
        outputs,
        print_line,
        args=vars(args),
        fingerprint=fingerprint(source, args.checkpoint, {**settings, "side": side, "halo": HALO, "outputs": outputs}),
    )
    if any(name.startswith(PROB_DIR + "/") for name in outputs):
        make_output_dir(os.path.join(args.save_res_path, PROB_DIR), "--save_res_path")
    sinks = make_sinks(args.save_res_path, source, out_names, shapes, args.threshold, labels is not None, resumed)
    note = predictor.tiling_note(shapes)
    if note:
        print(note, flush=True)
    if workers > 1 or args.scheduler:
        worker_predictor.cache_clear()  # the workers load their own
    t0 = time.time()
    run_blocks(source, blocks, spec, sinks, executor, journal, max_in_flight=in_flight(args, executor, side, shapes))
    seconds = time.time() - t0
    end_output(args.save_res_path, journal)
    checkpoint = args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint  # as run.json always had
    core = max(max(b.y1 - b.y0, b.x1 - b.x0) for b in blocks)
    blockwise = {"side": side, "core": core, "halo": HALO, "count": len(blocks), "continued": resumed}
    record = {"args": {**vars(args), "checkpoint": checkpoint}, **predictor.record(), "blocks": blockwise}
    out.finish(**record, **run_record(device))
    print(
        f"{len(source.names)} masks {describe_maps(args.save_res_path, outputs)} ({predictor.describe()}, "
        f"{seconds:.1f}s on "
        f"{describe_where(args, device, executor)}{predictor.describe_settings()}{describe_blocks(blocks, side)})"
    )
    if labels is not None:
        probs = next(s for s in sinks if isinstance(s, ArraySink)).probs
        print_scores(source.names, [probs[z] for z in range(len(source.names))], labels)


def in_flight(args, executor, side, shapes):
    """On a cluster, the blocks this process may keep in flight under --max_memory (a pool's are in its plan)."""
    if not args.scheduler:
        return None
    most = windows_in_flight(args.max_memory, side, shapes)
    if most < executor.workers:
        warn(
            f"--max_memory {args.max_memory:g} keeps {most} blocks in flight here, fewer than the cluster's "
            f"{executor.workers} worker threads: some wait (a larger --max_memory feeds them all)"
        )
    return most


def on_cluster(spec):
    """The spec a Dask worker loads: absolute model paths (its working folder is its own) and ONNX Runtime's
    threads left to each machine (its cores, not this one's)."""
    return spec._replace(checkpoints=tuple(os.path.abspath(c) for c in spec.checkpoints), threads=None)


def describe_maps(folder, outputs):
    """`in out/, probabilities in out/prob/`: where the masks and probabilities went."""
    if any(name.startswith(PROB_DIR + "/") for name in outputs):
        return f"in {os.path.join(folder, '')}, probabilities in {os.path.join(folder, PROB_DIR, '')}"
    for masks, probs in (("mask.tif", "prob.tif"), ("mask.ome.zarr", "prob.ome.zarr")):
        if probs in outputs:
            return f"in {os.path.join(folder, masks)}, probabilities in {os.path.join(folder, probs)}"
    return f"in {folder}"


def describe_where(args, device, executor):
    if args.scheduler:
        return f"Dask cluster {args.scheduler} ({executor.workers} worker threads)"
    return f"{device} x {args.workers} process(es)"


def describe_blocks(blocks, side):
    slices = len({b.z for b in blocks})
    return "" if len(blocks) == slices else f", {len(blocks)} blocks of {side} px"


if __name__ == "__main__":
    run_main(main)
