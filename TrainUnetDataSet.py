"""Train U-Net on ISBI 2012, on one device or data-parallel under OneFlow's launcher.

    python3 TrainUnetDataSet.py                                   # recipe chosen by device (see --recipe)
    python3 TrainUnetDataSet.py --epochs 40 --batch_size 2 --lr 3e-4 --width 64
    python3 -m oneflow.distributed.launch --nproc_per_node 8 TrainUnetDataSet.py
    python3 -m oneflow.distributed.launch --nnodes 2 --node_rank 0 --master_addr HOST \\
        --nproc_per_node 8 TrainUnetDataSet.py                      # and --node_rank 1 on the other node

Writes to --checkpoint_dir: `best` (lowest validation loss) and `last` checkpoints, `log.csv` (one row per
epoch, read by plot.py) and `config.json` (this run's resolved settings). Only rank 0 prints and writes.
"""
import argparse
import csv
import json
import math
import os
import random
import time

from lifeline import tie_to_launcher

tie_to_launcher()  # before oneflow's import, which under the launcher waits for every rank to join

import numpy as np  # noqa: E402
import oneflow as flow  # noqa: E402

from checkpoint import load_checkpoint, save_checkpoint, seed_epoch  # noqa: E402
from plot import plot_losses, read_log  # noqa: E402
from dataloader import SelfDataSet, find_pairs  # noqa: E402
from errors import DataError, check_output_dir, make_output_dir, run_main  # noqa: E402
from progress import epoch_bar  # noqa: E402
from run_record import run_record  # noqa: E402
from unet import UNet  # noqa: E402

# Defaults that depend on the machine live here and nowhere else. "full" is the article's setting
# (width-64 U-Net on whole 512x512 slices); "cpu" is sized to finish in under 30 minutes on 2 cores.
RECIPES = {
    "full": dict(width=64, crop_size=0, batch_size=2, epochs=60, lr=3e-4),
    "cpu": dict(width=16, crop_size=256, batch_size=4, epochs=24, lr=1e-3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", "--data-path", default="data/train", help="folder with image/ and label/ (same file names)")
    p.add_argument("--recipe", choices=["auto", *RECIPES], default="auto", help="defaults for the five flags below; auto: full on CUDA, cpu otherwise")
    p.add_argument("--epochs", type=int, help="passes over the training slices (recipe default)")
    p.add_argument("--batch_size", "--batch-size", type=int, help="images per step on each process (recipe default)")
    p.add_argument("--lr", type=float, help="Adam learning rate (recipe default)")
    p.add_argument("--width", type=int, help="U-Net channels at the first level, 64 in the paper (recipe default)")
    p.add_argument("--crop_size", "--crop-size", type=int, help="train on random square crops of this side; 0 = whole slices (recipe default)")
    p.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convolutions")
    p.add_argument("--val_slices", "--val-slices", type=int, default=5, help="hold out the last N slices (a contiguous block) for validation; 0 = none, then best = last")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    p.add_argument("--checkpoint_dir", "--checkpoint-dir", default="checkpoints", help="where checkpoints, log.csv and config.json go")
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, epoch, best validation loss)")
    p.add_argument("--num_workers", "--num-workers", type=int, default=0, help="DataLoader worker processes (data is in memory; 0 is usually fastest)")
    return p.parse_args(argv)


def resolve_args(args, cuda):
    """Fills recipe defaults and rejects nonsense, so a bad flag fails before any heavy work."""
    if args.recipe == "auto":
        args.recipe = "full" if cuda else "cpu"
        args.recipe_reason = "CUDA device found" if cuda else "no CUDA device"
    else:
        args.recipe_reason = "--recipe"
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("epochs", "batch_size", "width"):
        if getattr(args, key) <= 0:
            raise DataError(f"--{key} must be positive, got {getattr(args, key)}")
    if not args.lr > 0:
        raise DataError(f"--lr must be positive, got {args.lr}")
    if args.crop_size < 0 or 0 < args.crop_size < 16:
        raise DataError(f"--crop_size must be 0 or at least 16 (four poolings), got {args.crop_size}")
    if args.val_slices < 0:
        raise DataError(f"--val_slices must be 0 or more, got {args.val_slices}")
    if args.seed < 0:
        raise DataError(f"--seed must be 0 or more, got {args.seed}")
    check_output_dir(args.checkpoint_dir, "--checkpoint_dir")
    return args


def setup_distributed(device_flag):
    """Rank and world size come from the launcher's environment; a plain run is rank 0 of 1."""
    # Not os.environ: importing oneflow sets RANK=-1 in a plain run.
    rank, local_rank, world_size = flow.env.get_rank(), flow.env.get_local_rank(), flow.env.get_world_size()
    cuda = flow.cuda.is_available() if device_flag == "auto" else device_flag.startswith("cuda")
    if cuda and not flow.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    device = flow.device(f"cuda:{local_rank}" if cuda else "cpu")
    return rank, world_size, rank == 0, device


def split_names(data_path, val_slices):
    """Train and validation file names; validation is the last block, as neighbouring slices nearly repeat."""
    names = [image for image, _ in find_pairs(os.path.join(data_path, "image"), os.path.join(data_path, "label"))]
    if val_slices >= len(names):
        raise DataError(f"{data_path}: --val_slices {val_slices} leaves no training slice out of {len(names)}")
    cut = len(names) - val_slices
    return names[:cut], names[cut:]


def build_dataloaders(args, rank, world_size):
    train_names, val_names = split_names(args.data_path, args.val_slices)
    image_dir, label_dir = os.path.join(args.data_path, "image"), os.path.join(args.data_path, "label")
    # Each rank draws its own crops and flips; the sampler already gives it different slices.
    train_set = SelfDataSet(image_dir, label_dir, train_names, augment=True, crop_size=args.crop_size, seed=args.seed + rank)
    val_set = SelfDataSet(image_dir, label_dir, val_names) if val_names else None
    sampler = flow.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = flow.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers, drop_last=False)
    return loader, sampler, val_set


def all_reduce_sum(values, device):
    """Sums a list of floats over all ranks (a no-op on one process)."""
    t = flow.tensor(values, dtype=flow.float64, device=device)
    if flow.env.get_world_size() > 1:
        flow.comm.all_reduce(t)
    return t.numpy().tolist()


class NonFiniteLoss(ArithmeticError):
    """A NaN or inf loss at `step` (1-based) of an epoch."""


def train_one_epoch(model, loader, criterion, optimizer, device, progress=None):
    model.train()
    loss_sum, count = 0.0, 0
    for step, (image, label) in enumerate(loader, 1):
        image, label = image.to(device), label.to(device)
        loss = criterion(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"step {step}: loss is {loss_value}")
        loss_sum += loss_value * image.shape[0]
        count += image.shape[0]
        if progress is not None:
            progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            progress.update(image.shape[0])
    loss_sum, count = all_reduce_sum([loss_sum, count], device)
    return loss_sum / count


def evaluate(model, val_set, criterion, device):
    """Mean validation loss over whole slices.

    Every rank scores every slice: DDP broadcasts buffers in each forward, so ranks must run the same
    number of forwards, and the validation block is small.
    """
    model.eval()
    with flow.no_grad():
        losses = [criterion(model(flow.tensor(image[None], device=device)), flow.tensor(label[None], device=device)).item()
                  for image, label in (val_set[i] for i in range(len(val_set)))]
    return float(np.mean(losses))


def saved_note(last_saved):
    return f"last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"


def append_log(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_log(path, last_epoch):
    """On resume, drop log rows of epochs that the checkpoint does not contain."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= last_epoch]
    tmp = path + ".tmp"  # replaced in one rename: a kill here must not lose the log
    if os.path.exists(tmp):
        os.remove(tmp)
    for row in rows:
        append_log(tmp, row)
    if rows:
        os.replace(tmp, path)
    else:
        os.remove(path)


def write_config(args, world_size, device):
    config = dict(vars(args))
    config.update(world_size=world_size, **run_record(device))
    with open(os.path.join(args.checkpoint_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main(argv=None):
    """Trains and returns the model (every rank returns its replica)."""
    args = parse_args(argv)
    rank, world_size, master_process, device = setup_distributed(args.device)
    args = resolve_args(args, device.type == "cuda")
    random.seed(args.seed)
    np.random.seed(args.seed)
    flow.manual_seed(args.seed)

    loader, sampler, val_set = build_dataloaders(args, rank, world_size)
    model = UNet(n_channels=1, n_classes=1, bilinear=args.bilinear, width=args.width).to(device)
    optimizer = flow.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, best_val = 1, math.inf
    if args.resume:
        state = load_checkpoint(args.resume, device)
        if state["model_config"] != model.config():
            raise DataError(f"{args.resume}: trained as UNet{state['model_config']}, but this run builds UNet{model.config()}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        start_epoch, best_val = state["epoch"] + 1, state.get("best_val_loss", math.inf)
    if world_size > 1:
        # Broadcasts rank 0's weights, then all-reduces gradients in backward.
        model = flow.nn.parallel.DistributedDataParallel(model)
    criterion = flow.nn.BCEWithLogitsLoss()

    log_path = os.path.join(args.checkpoint_dir, "log.csv")
    if master_process:
        make_output_dir(args.checkpoint_dir, "--checkpoint_dir")
        if args.resume:
            truncate_log(log_path, start_epoch - 1)
        elif os.path.exists(log_path):
            os.remove(log_path)
        write_config(args, world_size, device)
        print(f"recipe {args.recipe} ({args.recipe_reason}): width {args.width}, crop {args.crop_size or 'none'}, "
              f"batch {args.batch_size} x {world_size} process(es), {args.epochs} epochs, lr {args.lr}, device {device}")
        print(f"{len(loader.dataset)} training slices, {len(val_set) if val_set else 0} validation slices; "
              f"writing to {args.checkpoint_dir}/", flush=True)

    last_saved = args.resume
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        seed_epoch(args.seed, rank, epoch)  # so a resumed run draws what an uninterrupted one would
        progress = epoch_bar(epoch, args.epochs, len(sampler), master_process, world_size)
        try:
            train_loss = train_one_epoch(model, loader, criterion, optimizer, device, progress)
        except NonFiniteLoss as e:
            raise DataError(f"epoch {epoch} {e}; stopped, {saved_note(last_saved)}") from None
        finally:
            progress.close()
        val_loss = evaluate(model, val_set, criterion, device) if val_set else float("nan")
        if val_set and not math.isfinite(val_loss):
            raise DataError(f"epoch {epoch}: validation loss is {val_loss}; stopped, {saved_note(last_saved)}")
        seconds = time.time() - t0
        if master_process:
            is_best = val_set is None or val_loss < best_val
            if val_set is not None and is_best:
                best_val = val_loss
            # Log row, then best, then last: a kill between them leaves `last` as the resume point and
            # anything after it (a log row, a newer best) is redone on resume.
            append_log(log_path, dict(epoch=epoch, train_loss=f"{train_loss:.5f}", val_loss=f"{val_loss:.5f}",
                                      lr=args.lr, seconds=f"{seconds:.1f}"))
            extra = dict(epoch=epoch, best_val_loss=best_val, args=vars(args))
            if is_best:
                save_checkpoint(os.path.join(args.checkpoint_dir, "best"), model, optimizer, **extra)
            last_saved = os.path.join(args.checkpoint_dir, "last")
            save_checkpoint(last_saved, model, optimizer, **extra)
            plot_losses(read_log(log_path), os.path.join(args.checkpoint_dir, "loss.png"))
            print(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}"
                  f"{'  *best' if is_best else ''}  {seconds:.1f}s", flush=True)
    if master_process:
        print(f"done: best checkpoint {os.path.join(args.checkpoint_dir, 'best')} (val loss {best_val:.4f})")
    return model


if __name__ == "__main__":
    run_main(main)
