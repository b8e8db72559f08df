"""Train U-Net on ISBI 2012, on one device or data-parallel under OneFlow's launcher.

    python3 TrainUnetDataSet.py                                   # recipe chosen by device (see --recipe)
    python3 TrainUnetDataSet.py --epochs 40 --batch_size 2 --lr 3e-4 --width 64
    python3 -m oneflow.distributed.launch --nproc_per_node 8 TrainUnetDataSet.py
    python3 -m oneflow.distributed.launch --nnodes 2 --node_rank 0 --master_addr HOST \\
        --nproc_per_node 8 TrainUnetDataSet.py                      # and --node_rank 1 on the other node

    python3 TrainUnetDataSet.py --graph                           # OneFlow static graph (nn.Graph), one process
    bash train.sh --epochs 30                                     # the longer CPU recipe (72 min on 2 cores)

Each epoch scores the held-out block (--val_slices) with the ISBI 2012 metrics (metrics.py). Writes to
--checkpoint_dir: `best` (highest validation V_rand) and `last` checkpoints, `log.csv` (one row per epoch:
losses, V_rand, V_info, pixel error; read by plot.py) and `config.json` (this run's resolved settings).
Only rank 0 prints and writes.
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
from dataloader import SelfDataSet, evenly_spaced, find_pairs, held_out_block  # noqa: E402
from errors import DataError, check_output_dir, make_output_dir, run_main  # noqa: E402
from graphs import InferenceGraphs, TrainGraph  # noqa: E402
from losses import LOSSES, SegmentationLoss  # noqa: E402
from metrics import THRESHOLDS, pixel_error, score_curve  # noqa: E402
from plot import plot_losses, read_log  # noqa: E402
from progress import epoch_bar  # noqa: E402
from run_record import run_record  # noqa: E402
from unet import UNet  # noqa: E402

# Defaults that depend on the machine live here and nowhere else. "full" is the article's setting
# (width-64 U-Net on whole 512x512 slices); "cpu" is sized to finish in under 30 minutes on 2 cores.
# A recipe's batch_size is the total over all processes; each process takes its share.
RECIPES = {
    "full": dict(width=64, crop_size=0, samples_per_slice=1, batch_size=2, epochs=60, lr=3e-4),
    "cpu": dict(width=16, crop_size=256, samples_per_slice=4, batch_size=4, epochs=13, lr=1e-3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", "--data-path", default="data/train", help="folder with image/ and label/ (same file names)")
    p.add_argument("--recipe", choices=["auto", *RECIPES], default="auto", help="defaults for the six flags below; auto: full on CUDA, cpu otherwise")
    p.add_argument("--epochs", type=int, help="passes over the training slices (recipe default)")
    p.add_argument("--batch_size", "--batch-size", type=int, help="images per step on each process (recipe default: the recipe's total batch split over the processes)")
    p.add_argument("--lr", type=float, help="Adam learning rate (recipe default)")
    p.add_argument("--width", type=int, help="U-Net channels at the first level, 64 in the paper (recipe default)")
    p.add_argument("--crop_size", "--crop-size", type=int, help="train on random square crops of this side; 0 = whole slices (recipe default)")
    p.add_argument("--samples_per_slice", "--samples-per-slice", type=int, help="random crops (or augmented whole slices) drawn from each training slice per epoch (recipe default; the cpu recipe's 4 crops of 256 cover a 512x512 slice's area once)")
    p.add_argument("--bilinear", action="store_true", help="bilinear upsampling instead of transposed convolutions")
    p.add_argument("--loss", choices=LOSSES, default="bce_dice", help="bce (the article's), or bce_dice (BCE + soft Dice on membranes)")
    p.add_argument("--elastic_sigma", "--elastic-sigma", type=float, default=10.0, help="std (px) of the elastic deformation's 3x3 grid displacements, 10 in the paper; 0 = off")
    p.add_argument("--border_weight", "--border-weight", type=float, default=0.0, help="w0 of the paper's border weight map (paper: 10, sigma 5 px); 0 = unweighted loss")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="learning rate over the run: cosine decay to 0 per step, or constant")
    p.add_argument("--graph", action="store_true", help="train and validate through nn.Graph (static graph) instead of eager mode")
    p.add_argument("--amp", action="store_true", help="mixed precision; CUDA with --graph only")
    p.add_argument("--bn_slices", "--bn-slices", type=int, default=8, help="after each epoch, set BatchNorm statistics from this many whole training slices (precise BN) before validating and saving; 0 = keep training's running averages")
    p.add_argument("--val_slices", "--val-slices", type=int, default=5, help="hold out N neighbouring slices (a contiguous block) for validation; 0 = none, then best = last")
    p.add_argument("--val_start", "--val-start", type=int, default=-1, help="index (in natural file-name order) of the held-out block's first slice; -1 = the last N slices. Other values give cross-validation folds")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    p.add_argument("--checkpoint_dir", "--checkpoint-dir", default="checkpoints", help="where checkpoints, log.csv and config.json go")
    p.add_argument("--resume", help="checkpoint to continue from (model, optimizer, epoch, best validation loss)")
    p.add_argument("--num_workers", "--num-workers", type=int, default=0, help="DataLoader worker processes (data is in memory; 0 is usually fastest)")
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
    for key in ("epochs", "batch_size", "width", "samples_per_slice"):
        if getattr(args, key) <= 0:
            raise DataError(f"--{key} must be positive, got {getattr(args, key)}")
    if not args.lr > 0:
        raise DataError(f"--lr must be positive, got {args.lr}")
    if args.crop_size < 0 or 0 < args.crop_size < 16:
        raise DataError(f"--crop_size must be 0 or at least 16 (four poolings), got {args.crop_size}")
    if args.elastic_sigma < 0 or args.border_weight < 0:
        raise DataError("--elastic_sigma and --border_weight must be 0 or more")
    if args.bn_slices < 0:
        raise DataError(f"--bn_slices must be 0 or more, got {args.bn_slices}")
    if args.val_slices < 0:
        raise DataError(f"--val_slices must be 0 or more, got {args.val_slices}")
    if args.val_start < -1:
        raise DataError(f"--val_start must be -1 (the last block) or a slice index, got {args.val_start}")
    if args.amp and not (cuda and args.graph):
        raise DataError("--amp needs --graph on a CUDA device (OneFlow's eager CPU path has no float16 kernels worth using)")
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


def split_names(data_path, val_slices, val_start=-1):
    """Train and validation file names of `data_path`; validation is one contiguous block (held_out_block)."""
    names = [image for image, _ in find_pairs(os.path.join(data_path, "image"), os.path.join(data_path, "label"))]
    return held_out_block(names, val_slices, val_start, data_path)


def build_dataloaders(args, rank, world_size, device):
    train_names, val_names = split_names(args.data_path, args.val_slices, args.val_start)
    image_dir, label_dir = os.path.join(args.data_path, "image"), os.path.join(args.data_path, "label")
    # Each rank draws its own crops and flips; the sampler already gives it different slices.
    train_set = SelfDataSet(image_dir, label_dir, train_names, augment=True, crop_size=args.crop_size, seed=args.seed + rank,
                            elastic_sigma=args.elastic_sigma, border_weight=args.border_weight, samples_per_slice=args.samples_per_slice)
    val_set = SelfDataSet(image_dir, label_dir, val_names) if val_names else None
    sampler = flow.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    # A graph is compiled for one batch shape, so --graph drops each epoch's short last batch.
    loader = flow.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                        num_workers=args.num_workers, drop_last=args.graph, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise DataError(f"{args.data_path}: {len(train_set)} training sample(s) per epoch over all processes give no full batch of --batch_size {args.batch_size}")
    return loader, sampler, val_set


def build_optimizer(args, model, steps_per_epoch):
    optimizer = flow.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = None
    if args.schedule == "cosine":
        scheduler = flow.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    return optimizer, scheduler


def lr_at(args, step, total_steps):
    """The learning rate after `step` optimizer steps (the value both schedulers follow)."""
    if args.schedule == "constant":
        return args.lr
    return args.lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2


def all_reduce_sum(values, device):
    """Sums a list of floats over all ranks (a no-op on one process)."""
    t = flow.tensor(values, dtype=flow.float64, device=device)
    if flow.env.get_world_size() > 1:
        flow.comm.all_reduce(t)
    return t.numpy().tolist()


def recompute_bn_stats(model, images, count, batch_size, device, rank, world_size):
    """Sets every BatchNorm's running mean and variance to its statistics over `count` whole training slices.

    The running averages training leaves behind follow the last few batches of augmented crops; on one
    checkpoint they scored held-out V_rand 0.29 where the same weights with whole-slice statistics scored
    0.66 (this is "precise BN"). Slices are spread evenly over the training set and shared between ranks,
    and every rank ends with the same statistics, so no rank's last batch decides what is saved.
    """
    bns = [m for m in model.modules() if isinstance(m, flow.nn.BatchNorm2d)]
    picked = evenly_spaced(len(images), count)
    mine = picked[rank::world_size]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 1.0  # each forward replaces the running statistics with its own batch's
    model.train()
    weight, sums = 0.0, np.zeros(2 * sum(b.num_features for b in bns))
    with flow.no_grad():
        for start in range(0, len(mine), batch_size):
            batch = np.stack([images[i] for i in mine[start:start + batch_size]])
            model.forward(flow.tensor(batch, device=device))  # .forward: no DDP buffer broadcast
            stats = []
            for b in bns:
                mean = b.running_mean.numpy().astype(np.float64)
                stats += [mean, b.running_var.numpy() + mean ** 2]
            sums += batch.size * np.concatenate(stats)
            weight += batch.size
    for b, momentum in zip(bns, momenta):
        b.momentum = momentum
    totals = all_reduce_sum([weight, *sums], device)
    moments, offset = np.array(totals[1:]) / totals[0], 0
    for b in bns:
        c = b.num_features
        mean, square = moments[offset:offset + c], moments[offset + c:offset + 2 * c]
        offset += 2 * c
        b.running_mean.copy_(flow.tensor(mean, dtype=flow.float32, device=device))
        b.running_var.copy_(flow.tensor(np.maximum(square - mean ** 2, 0.0), dtype=flow.float32, device=device))


class NonFiniteLoss(ArithmeticError):
    """A NaN or inf loss at `step` (1-based) of an epoch."""


def train_one_epoch(step_fn, model, loader, device, progress=None):
    """One pass over this rank's share of the slices; returns the mean loss over all ranks."""
    model.train()
    loss_sum, count = 0.0, 0
    for step, batch in enumerate(loader, 1):
        batch = [t.to(device) for t in batch]
        loss_value = step_fn(*batch).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"step {step}: loss is {loss_value}")
        loss_sum += loss_value * batch[0].shape[0]
        count += batch[0].shape[0]
        if progress is not None:
            progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            progress.update(batch[0].shape[0])
    loss_sum, count = all_reduce_sum([loss_sum, count], device)
    return loss_sum / count


def eager_step(model, criterion, optimizer, scheduler):
    def step(image, *target):
        loss = criterion(model(image), *target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss
    return step


def evaluate(forward, model, val_set, criterion, device, rank, world_size):
    """Validation loss, V_rand, V_info and pixel error over the whole held-out slices.

    Ranks share the slices and sum their results. `forward` must not run collectives: eager DDP's
    forward hook broadcasts buffers, so eager mode calls `model.forward` directly (see main).
    """
    model.eval()
    if world_size > 1:
        # Each rank's last training forward updated its own BatchNorm statistics; score with rank 0's.
        for buffer in model.buffers():
            flow.comm.broadcast(buffer, 0)
    loss_sum, error_sum, curves = 0.0, 0.0, np.zeros((len(THRESHOLDS), 2))
    with flow.no_grad():
        for i in range(rank, len(val_set), world_size):
            image, label = val_set.images[i], val_set.labels[i]
            logits = forward(flow.tensor(image[None], device=device))
            loss_sum += criterion(logits, flow.tensor(label[None], device=device)).item()
            prob, label255 = flow.sigmoid(logits)[0, 0].numpy(), label[0] * 255
            curves += score_curve(prob, label255)
            error_sum += pixel_error(prob, label255)
    totals = all_reduce_sum([loss_sum, error_sum, *curves.ravel()], device)
    n = len(val_set)
    curve = np.array(totals[2:]).reshape(-1, 2) / n
    return dict(val_loss=totals[0] / n, v_rand=float(curve[:, 0].max()), v_info=float(curve[:, 1].max()), pixel_error=totals[1] / n)


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


def resume_from(args, model, optimizer, scheduler, steps_per_epoch, master_process, device):
    """Loads --resume into model and optimizer state; returns (first epoch to run, best V_rand so far)."""
    state = load_checkpoint(args.resume, device)
    if state["model_config"] != model.config():
        raise DataError(f"{args.resume}: trained as UNet{state['model_config']}, but this run builds UNet{model.config()}")
    model.load_state_dict(state["model"])
    if not args.graph and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = args.lr  # this run's --lr, not the stored one
    elif args.graph != bool(state.get("graph")) and master_process:
        restart = "Adam's moments and the lr schedule restart" if args.graph else "Adam's moments restart"
        print(f"note: {args.resume} holds {'eager' if args.graph else 'graph'} optimizer state; {restart}")
    if scheduler is not None and not args.graph:
        # Rebuilt for this run's --epochs rather than loaded, then moved to where the checkpoint stopped.
        scheduler.last_step = state["epoch"] * steps_per_epoch - 1
        scheduler.step()
    return state["epoch"] + 1, state.get("best_v_rand", -math.inf), state


def save_checkpoints(args, model, optimizer, train_graph, is_best, **extra):
    """Writes `best` (if is_best), then `last`; returns the path of `last`."""
    if train_graph is not None:
        # The graph keeps Adam's moments and its step counter itself; store those instead of the eager optimizer's.
        extra["graph"] = {k: v for k, v in train_graph.state_dict().items() if not isinstance(v, dict)}
    else:
        extra.update(optimizer=optimizer.state_dict())
    if is_best:
        save_checkpoint(os.path.join(args.checkpoint_dir, "best"), model, **extra)
    last = os.path.join(args.checkpoint_dir, "last")
    save_checkpoint(last, model, **extra)
    return last


def main(argv=None):
    """Trains and returns the model (every rank returns its replica)."""
    args = parse_args(argv)
    rank, world_size, master_process, device = setup_distributed(args.device)
    args = resolve_args(args, device.type == "cuda", world_size)
    if args.graph and world_size > 1:
        raise DataError("--graph runs on one process; under the launcher train in eager mode (DistributedDataParallel)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    flow.manual_seed(args.seed)

    loader, sampler, val_set = build_dataloaders(args, rank, world_size, device)
    model = UNet(n_channels=1, n_classes=1, bilinear=args.bilinear, width=args.width).to(device)
    optimizer, scheduler = build_optimizer(args, model, len(loader))
    criterion = SegmentationLoss(args.loss)
    start_epoch, best_v_rand, resumed = 1, -math.inf, None
    if args.resume:
        start_epoch, best_v_rand, resumed = resume_from(args, model, optimizer, scheduler, len(loader), master_process, device)
    if world_size > 1:
        # Broadcasts rank 0's weights, then all-reduces gradients in backward.
        model = flow.nn.parallel.DistributedDataParallel(model)
    train_graph = None
    if args.graph:
        train_graph = TrainGraph(model, criterion, optimizer, scheduler, amp=args.amp)
        if resumed is not None and resumed.get("graph"):
            train_graph.load_state_dict({"model": model.state_dict(), "criterion": {}, **resumed["graph"]})
        step_fn, forward = train_graph, InferenceGraphs(model, amp=args.amp)
    else:
        step_fn, forward = eager_step(model, criterion, optimizer, scheduler), model.forward

    log_path = os.path.join(args.checkpoint_dir, "log.csv")
    if master_process:
        make_output_dir(args.checkpoint_dir, "--checkpoint_dir")
        if args.resume:
            truncate_log(log_path, start_epoch - 1)
        elif os.path.exists(log_path):
            os.remove(log_path)
        write_config(args, world_size, device)
        print(f"recipe {args.recipe} ({args.recipe_reason}): width {args.width}, crop {args.crop_size or 'none'}, "
              f"batch {args.batch_size} x {world_size} process(es), {args.epochs} epochs, lr {args.lr} {args.schedule}, "
              f"loss {args.loss}, {'graph' if args.graph else 'eager'} on {device}")
        print(f"{len(loader.dataset.images)} training slices x {args.samples_per_slice} sample(s) per epoch, "
              f"{len(val_set) if val_set else 0} validation slices; "
              f"writing to {args.checkpoint_dir}/", flush=True)

    total_steps = args.epochs * len(loader)
    last_saved = args.resume
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        seed_epoch(args.seed, rank, epoch)  # so a resumed run draws what an uninterrupted one would
        progress = epoch_bar(epoch, args.epochs, len(sampler), master_process, world_size)
        try:
            train_loss = train_one_epoch(step_fn, model, loader, device, progress)
        except NonFiniteLoss as e:
            raise DataError(f"epoch {epoch} {e}; stopped, {saved_note(last_saved)}") from None
        finally:
            progress.close()
        if args.bn_slices:
            recompute_bn_stats(model, loader.dataset.images, args.bn_slices, args.batch_size, device, rank, world_size)
        scores = evaluate(forward, model, val_set, criterion, device, rank, world_size) if val_set else {}
        if scores and not math.isfinite(scores["val_loss"]):
            raise DataError(f"epoch {epoch}: validation loss is {scores['val_loss']}; stopped, {saved_note(last_saved)}")
        seconds = time.time() - t0
        if master_process:
            is_best = not scores or scores["v_rand"] > best_v_rand
            if scores and is_best:
                best_v_rand = scores["v_rand"]
            row = dict(epoch=epoch, train_loss=f"{train_loss:.5f}")
            row.update({k: f"{scores.get(k, float('nan')):.5f}" for k in ("val_loss", "v_rand", "v_info", "pixel_error")})
            row.update(lr=f"{lr_at(args, epoch * len(loader), total_steps):.3g}", seconds=f"{seconds:.1f}")
            # Log row, then best, then last: a kill between them leaves `last` as the resume point and
            # anything after it (a log row, a newer best) is redone on resume.
            append_log(log_path, row)
            last_saved = save_checkpoints(args, model, optimizer, train_graph, is_best,
                                          epoch=epoch, best_v_rand=best_v_rand, run_args=vars(args))
            plot_losses(read_log(log_path), os.path.join(args.checkpoint_dir, "loss.png"))
            print(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  val loss {row['val_loss']}  "
                  f"V_rand {row['v_rand']}  V_info {row['v_info']}  pixel error {row['pixel_error']}"
                  f"{'  *best' if is_best else ''}  {seconds:.1f}s", flush=True)
    if master_process:
        print(f"done: best checkpoint {os.path.join(args.checkpoint_dir, 'best')} (validation V_rand {best_v_rand:.4f})")
    return model


if __name__ == "__main__":
    run_main(main)
