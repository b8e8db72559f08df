"""Train U-Net on ISBI 2012, on one device or data-parallel under a launcher.

    python3 TrainUnetDataSet.py                                   # recipe chosen by device (see --recipe)
    python3 TrainUnetDataSet.py --epochs 40 --batch_size 2 --lr 3e-4 --width 64
    python3 -m isbi_unet.launch --nproc_per_node 8 TrainUnetDataSet.py  # 8 processes; passes on Ctrl-C, exit codes
    python3 -m oneflow.distributed.launch --nproc_per_node 8 TrainUnetDataSet.py  # the article's: trains the same
    python3 -m isbi_unet.launch --nnodes 2 --node_rank 0 --master_addr HOST \\
        --nproc_per_node 8 TrainUnetDataSet.py                      # and --node_rank 1 on the other node
    python3 TrainUnetDataSet.py --graph                           # OneFlow static graph (nn.Graph), one process
    python3 TrainUnetDataSet.py --resume checkpoints/last         # continue a run where it stopped

Each epoch scores the held-out block (--val_slices) with the ISBI 2012 metrics. Writes to
--checkpoint_dir: `best` (highest validation V_rand) and `last` checkpoints, `log.csv` (one row per epoch:
losses, V_rand, V_info, pixel error; read by plot.py), `loss.png` and `config.json` (this run's resolved
settings, versions and machine). Only rank 0 prints and writes.
"""

import argparse
import math
import os
import random
import shutil
import time
from types import SimpleNamespace

from isbi_unet import runtime
from isbi_unet.interrupt import StopSignals, guard_start_up

if __name__ == "__main__":  # before `import oneflow`, which under the launcher waits for every process
    guard_start_up()  # Ctrl-C before the training loop's own handler: one line, exit 130 (isbi_unet/interrupt.py)
    runtime.join_job(runtime.flags().parse_known_args()[0].join_timeout)

import numpy as np
import oneflow as flow

from dataloader import SelfDataSet
from isbi_unet import watchdog
from isbi_unet.checkpoint import load_checkpoint, save_checkpoint
from isbi_unet.device import select_device
from isbi_unet.engine import EagerEngine, GraphEngine
from isbi_unet.errors import (
    DataError,
    WriteError,
    check_apart,
    check_flags,
    check_output_dir,
    make_output_dir,
    run_main,
)
from isbi_unet.figures import plot_losses, read_log
from isbi_unet.images import split_names, training_sources
from isbi_unet.losses import LOSSES, SegmentationLoss
from isbi_unet.record import write_json_record
from isbi_unet.training import (
    NonFiniteLoss,
    append_log,
    evaluate,
    lr_at,
    recompute_bn_stats,
    train_one_epoch,
    truncate_log,
)
from unet import UNet

# Defaults that depend on the machine live here and nowhere else. "full" is the article's setting
# (width-64 U-Net on whole 512x512 slices); "cpu" is sized to finish in under 30 minutes on 2 cores.
# A recipe's batch_size is the total over all processes; each process takes its share.
RECIPES = {
    "full": dict(width=64, crop_size=0, samples_per_slice=1, batch_size=2, epochs=60, lr=3e-4),
    "cpu": dict(width=16, crop_size=256, samples_per_slice=4, batch_size=4, epochs=13, lr=1e-3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[runtime.flags()],  # --join_timeout and --step_timeout, also read before OneFlow starts
    )
    add = p.add_argument
    add(
        "--data_path",
        "--data-path",
        default="data/train",
        help="folder with image/ and label/ (same file names), or with the challenge's train-volume.tif and "
        "train-labels.tif stacks",
    )
    add(
        "--recipe",
        choices=["auto", *RECIPES],
        default="auto",
        help="defaults for the six flags below; auto: full on CUDA, cpu otherwise",
    )
    add("--epochs", type=int, help="passes over the training slices (recipe default)")
    add(
        "--batch_size",
        "--batch-size",
        type=int,
        help="images per step on each process (recipe default: the recipe's total batch split over the processes)",
    )
    add("--lr", type=float, help="Adam learning rate (recipe default)")
    add("--width", type=int, help="U-Net channels at the first level, 64 in the paper (recipe default)")
    add(
        "--crop_size",
        "--crop-size",
        type=int,
        help="train on random square crops of this side; 0 = whole slices (recipe default)",
    )
    add(
        "--samples_per_slice",
        "--samples-per-slice",
        type=int,
        help="random crops (or augmented whole slices) drawn from each training slice per epoch (recipe default; "
        "the cpu recipe's 4 crops of 256 cover a 512x512 slice's area once)",
    )
    add("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convolutions")
    add(
        "--loss",
        choices=LOSSES,
        default="bce_dice",
        help="bce (the article's), or bce_dice (BCE + soft Dice on membranes)",
    )
    add(
        "--elastic_sigma",
        "--elastic-sigma",
        type=float,
        default=10.0,
        help="std (px) of the elastic deformation's 3x3 grid displacements, 10 in the paper; 0 = off",
    )
    add(
        "--border_weight",
        "--border-weight",
        type=float,
        default=0.0,
        help="w0 of the paper's border weight map (paper: 10, sigma 5 px); 0 = unweighted loss",
    )
    add(
        "--schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="learning rate over the run: cosine decay to 0 per step, or constant",
    )
    add("--graph", action="store_true", help="train and validate through nn.Graph (static graph) instead of eager mode")
    add("--amp", action="store_true", help="mixed precision; CUDA with --graph only")
    add(
        "--bn_slices",
        "--bn-slices",
        type=int,
        default=8,
        help="after each epoch, set BatchNorm statistics from this many whole training slices (precise BN) "
        "before validating and saving; 0 = keep training's running averages",
    )
    add(
        "--val_slices",
        "--val-slices",
        type=int,
        default=5,
        help="hold out N neighbouring slices (a contiguous block) for validation; 0 = none, then best = last",
    )
    add(
        "--val_start",
        "--val-start",
        type=int,
        default=-1,
        help="index (in natural file-name order) of the held-out block's first slice; -1 = the last N slices. "
        "Other values give cross-validation folds",
    )
    add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    add("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    add(
        "--checkpoint_dir",
        "--checkpoint-dir",
        help="where checkpoints, log.csv and config.json go (default: the folder of --resume, else checkpoints)",
    )
    add("--resume", help="checkpoint to continue from (model, optimizer, epoch, best validation V_rand)")
    add("--overwrite", action="store_true", help="train into a --checkpoint_dir that holds another run, replacing it")
    add(
        "--num_workers",
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes (data is in memory; 0 is usually fastest)",
    )
    return p.parse_args(argv)


def resolve_args(args, cuda, world_size=1):
    """Fills recipe defaults and rejects nonsense, so a bad flag fails before any heavy work."""
    if args.recipe == "auto":
        args.recipe = "full" if cuda else "cpu"
        args.recipe_reason = "CUDA device found" if cuda else "no CUDA device"
    else:
        args.recipe_reason = "--recipe"
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, max(1, value // world_size) if key == "batch_size" else value)
    check_flags(
        args,
        positive=("epochs", "batch_size", "width", "samples_per_slice", "lr", "join_timeout", "step_timeout"),
        non_negative=("bn_slices", "val_slices", "seed", "num_workers", "elastic_sigma", "border_weight"),
    )
    if args.crop_size < 0 or 0 < args.crop_size < 16:
        raise DataError(f"--crop_size must be 0 or at least 16 (four poolings), got {args.crop_size}")
    if args.val_start < -1:
        raise DataError(f"--val_start must be -1 (the last block) or a slice index, got {args.val_start}")
    if args.amp and not (cuda and args.graph):
        raise DataError(
            "--amp needs --graph on a CUDA device (OneFlow's eager CPU path has no float16 kernels worth using)"
        )
    if args.graph and world_size > 1:
        raise DataError("--graph runs on one process; under the launcher train in eager mode (DistributedDataParallel)")
    resolve_checkpoint_dir(args)
    return args


RUN_FILES = ("log.csv", "config.json", "best", "last")  # what makes a folder hold a run


def resolve_checkpoint_dir(args):
    """--checkpoint_dir: a resumed run continues in its own folder; a folder holding another run is kept
    unless --overwrite says to replace it; and the folder lies apart from the data."""
    if args.checkpoint_dir is None:
        args.checkpoint_dir = (os.path.dirname(args.resume) or ".") if args.resume else "checkpoints"
    check_apart(args.checkpoint_dir, "--checkpoint_dir", [(args.data_path, "--data_path")])
    check_output_dir(args.checkpoint_dir, "--checkpoint_dir")
    folder = os.path.realpath(args.checkpoint_dir)
    continuing = args.resume is not None and os.path.realpath(os.path.dirname(args.resume) or ".") == folder
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    args.replace_run = bool(found) and not continuing
    # Only rank 0 decides: it writes the folder, and another rank looking later could see this run's own files.
    if args.replace_run and not args.overwrite and runtime.whoami().rank == 0:
        raise DataError(
            f"{args.checkpoint_dir}: --checkpoint_dir holds another run ({', '.join(found)}); continue it with "
            f"--resume {os.path.join(args.checkpoint_dir, 'last')}, write elsewhere, or replace it with --overwrite"
        )


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    flow.manual_seed(seed)


def build_dataloaders(args, device):
    """The training DataLoader (this rank's share, augmented) and the held-out slices (or None)."""
    rank, _, world_size, _ = runtime.whoami()
    train_names, val_names = split_names(args.data_path, args.val_slices, args.val_start)
    image_dir, label_dir = training_sources(args.data_path)
    # Each rank draws its own crops and flips; the sampler already gives it different slices.
    train_set = SelfDataSet(
        image_dir,
        label_dir,
        train_names,
        augment=True,
        crop_size=args.crop_size,
        seed=args.seed + rank,
        elastic_sigma=args.elastic_sigma,
        border_weight=args.border_weight,
        samples_per_slice=args.samples_per_slice,
    )
    check_whole_slices_batch(args, train_set)
    val_set = SelfDataSet(image_dir, label_dir, val_names) if val_names else None
    sampler = flow.utils.data.DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed
    )
    # A graph is compiled for one batch shape, so --graph drops each epoch's short last batch.
    loader = flow.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        drop_last=args.graph,
        pin_memory=device.type == "cuda",
    )
    if len(loader) == 0:
        raise DataError(
            f"{args.data_path}: {len(train_set)} training sample(s) per epoch over all processes "
            f"give no full batch of --batch_size {args.batch_size}"
        )
    return loader, val_set


def check_whole_slices_batch(args, train_set):
    """Whole slices of different sizes cannot share a batch, nor one compiled graph: say so before training."""
    sizes = sorted({image.shape[1:] for image in train_set.images})
    if args.crop_size or len(sizes) == 1 or (args.batch_size == 1 and not args.graph):
        return
    (h1, w1), (h2, w2) = sizes[0], sizes[-1]
    raise DataError(
        f"{args.data_path}: training slices differ in size ({w1}x{h1} ... {w2}x{h2}), so whole slices cannot be "
        "batched; train on crops (--crop_size N) or, in eager mode, with --batch_size 1"
    )


def build_engine(args, model, criterion, steps_per_epoch):
    """Adam, the lr schedule and the engine (eager, DDP under the launcher, or nn.Graph)."""
    optimizer = flow.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = None
    if args.schedule == "cosine":
        scheduler = flow.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    if args.graph:
        return GraphEngine(model, criterion, optimizer, scheduler, amp=args.amp)
    return EagerEngine(model, criterion, optimizer, scheduler, distributed=runtime.whoami().world > 1)


def load_weights(args, model, device):
    """--resume's checkpoint with its weights loaded into `model` (None without --resume)."""
    if not args.resume:
        return None
    checkpoint = load_checkpoint(args.resume, device)
    if checkpoint["model_config"] != model.config():
        raise DataError(
            f"{args.resume}: trained as UNet{checkpoint['model_config']}, but this run builds UNet{model.config()}"
        )
    model.load_state_dict(checkpoint["model"])
    return checkpoint


def start_run(args, engine, checkpoint, steps_per_epoch, master_process):
    """Where this run starts: epoch, best V_rand so far, last saved checkpoint; optimizer state from a resume."""
    run = SimpleNamespace(start_epoch=1, best_v_rand=-math.inf, last_saved=None)
    if checkpoint is not None:
        note = engine.load_state_dict(checkpoint, checkpoint["epoch"] * steps_per_epoch, args.lr)
        if note and master_process:
            print(f"note: {args.resume} {note}")
        run.start_epoch, run.last_saved = checkpoint["epoch"] + 1, args.resume
        run.best_v_rand = checkpoint.get("best_v_rand", -math.inf)
    return run


def prepare_checkpoint_dir(args, run, loader, val_set, device):
    """Rank 0: the folder, a log without the epochs this run redoes, config.json, and what the run will do."""
    world_size = runtime.whoami().world
    make_output_dir(args.checkpoint_dir, "--checkpoint_dir")
    if args.replace_run:  # --overwrite: nothing of the old run stays to be mistaken for this one's
        for name in (*RUN_FILES, "loss.png"):
            remove_path(os.path.join(args.checkpoint_dir, name))
    truncate_log(os.path.join(args.checkpoint_dir, "log.csv"), run.start_epoch - 1)
    write_json_record(
        os.path.join(args.checkpoint_dir, "config.json"), {**vars(args), "world_size": world_size}, device
    )
    print(
        f"recipe {args.recipe} ({args.recipe_reason}): width {args.width}, crop {args.crop_size or 'none'}, "
        f"batch {args.batch_size} x {world_size} process(es), {args.epochs} epochs, lr {args.lr} {args.schedule}, "
        f"loss {args.loss}, {engine_name(args)} on {device}"
    )
    print(
        f"{len(loader.dataset.images)} training slices x {args.samples_per_slice} sample(s) per epoch, "
        f"{len(val_set) if val_set else 0} validation slices; writing to {args.checkpoint_dir}/",
        flush=True,
    )


def remove_path(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def engine_name(args):
    return "graph" if args.graph else "eager"


def save_epoch(args, engine, run, epoch, train_loss, scores, seconds, steps_per_epoch):
    """Rank 0: log row, then best, then last; a kill between them leaves `last` as the resume point."""
    v_rand = scores.get("v_rand", math.nan)
    # Best among finite scores; until there is one (no held-out block, or labels without cells) it follows last.
    is_best = v_rand > run.best_v_rand if math.isfinite(v_rand) else not math.isfinite(run.best_v_rand)
    if math.isfinite(v_rand) and is_best:
        run.best_v_rand = v_rand
    row = dict(epoch=epoch, train_loss=f"{train_loss:.5f}")
    row.update({k: f"{scores.get(k, float('nan')):.5f}" for k in ("val_loss", "v_rand", "v_info", "pixel_error")})
    lr = lr_at(args.lr, args.schedule, epoch * steps_per_epoch, args.epochs * steps_per_epoch)
    row.update(lr=f"{lr:.3g}", seconds=f"{seconds:.1f}")
    log_path = os.path.join(args.checkpoint_dir, "log.csv")
    append_log(log_path, row)
    extra = dict(epoch=epoch, best_v_rand=run.best_v_rand, run_args=vars(args), **engine.state_dict())
    if is_best:
        save_checkpoint(os.path.join(args.checkpoint_dir, "best"), engine.model, **extra)
    run.last_saved = os.path.join(args.checkpoint_dir, "last")
    save_checkpoint(run.last_saved, engine.model, **extra)
    plot_losses(read_log(log_path), os.path.join(args.checkpoint_dir, "loss.png"))
    print(
        f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  val loss {row['val_loss']}  "
        f"V_rand {row['v_rand']}  V_info {row['v_info']}  pixel error {row['pixel_error']}"
        f"{'  *best' if is_best else ''}  {seconds:.1f}s",
        flush=True,
    )


def best_reason(args, run):
    if math.isfinite(run.best_v_rand):
        return f"validation V_rand {run.best_v_rand:.4f}"
    if not args.val_slices:
        return "the last epoch: --val_slices 0 holds out nothing to score"
    return "the last epoch: no epoch had a finite validation V_rand, as no held-out label has a cell (255) pixel"


def main(argv=None):
    """Trains and returns the model (every rank returns its replica)."""
    args = parse_args(argv)
    device = select_device(args.device, runtime.whoami().local_rank)
    with StopSignals(device) as stop:  # Ctrl-C and SIGTERM now stop between steps (isbi_unet/interrupt.py)
        return train(args, device, stop)


def train(args, device, stop):
    """main() once the signals are ours; a failed write or a NaN stops naming what is left to resume from."""
    args = resolve_args(args, device.type == "cuda", runtime.whoami().world)
    master_process = runtime.whoami().rank == 0
    seed_all(args.seed)

    loader, val_set = build_dataloaders(args, device)
    model = UNet(n_channels=1, n_classes=1, bilinear=args.bilinear, width=args.width).to(device)
    criterion = SegmentationLoss(args.loss)
    checkpoint = load_weights(args, model, device)  # before DDP broadcasts rank 0's weights
    engine = build_engine(args, model, criterion, len(loader))
    run = start_run(args, engine, checkpoint, len(loader), master_process)
    stop.position, stop.resume_from = (run.start_epoch, 0), run.last_saved
    if runtime.whoami().world > 1:  # a frozen peer would block the collectives forever
        watchdog.arm(args.step_timeout, os.path.join(args.checkpoint_dir, "last"))
    try:
        if master_process:
            prepare_checkpoint_dir(args, run, loader, val_set, device)
        for epoch in range(run.start_epoch, args.epochs + 1):
            stop.check()  # a signal during start-up, or during the previous epoch's validation or save
            t0 = time.time()
            train_loss = train_one_epoch(engine, loader, epoch, args.epochs, args.seed, device, stop)
            if args.bn_slices:
                recompute_bn_stats(model, loader.dataset.images, args.bn_slices, args.batch_size, device)
            scores = evaluate(engine, val_set, criterion, device, epoch) if val_set else {}
            if master_process:
                with stop.protected():  # a second Ctrl-C waits for the checkpoints to be written
                    save_epoch(args, engine, run, epoch, train_loss, scores, time.time() - t0, len(loader))
                    stop.resume_from = run.last_saved
    except NonFiniteLoss as e:
        raise DataError(f"{e}; stopped, {saved_note(run)}") from None
    except WriteError as e:
        raise WriteError(f"{e}; {saved_note(run)}") from None
    finally:
        watchdog.disarm()
    if master_process:
        print(f"done: best checkpoint {os.path.join(args.checkpoint_dir, 'best')} ({best_reason(args, run)})")
    return model


def saved_note(run):
    """The last checkpoint a stopped run can continue from (a failed save keeps the previous one in place)."""
    if run.last_saved and os.path.exists(run.last_saved):
        return f"last good checkpoint is {run.last_saved}"
    return "no checkpoint was saved"


if __name__ == "__main__":
    run_main(main)
