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
settings, versions and machine; isbi_unet/train_settings.py declares them). A resumed run takes its settings
from config.json; of its flags only --epochs and how and where it runs may change. Only rank 0 prints and writes.
"""

from isbi_unet.process import start_up

if __name__ == "__main__":  # before `import oneflow`, which under the launcher waits for every process
    start_up(join=True)  # Ctrl-C now is one line, exit 130; joins the job under --join_timeout (isbi_unet/process)

import math
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import oneflow as flow

from dataloader import SelfDataSet
from isbi_unet import run_dir
from isbi_unet.checkpoint import load_checkpoint, save_checkpoint, saved_note
from isbi_unet.device import select_device
from isbi_unet.engine import EagerEngine, GraphEngine
from isbi_unet.errors import DataError, WriteError
from isbi_unet.figures import plot_losses, read_log
from isbi_unet.flags import parse
from isbi_unet.images import split_names, training_sources
from isbi_unet.losses import SegmentationLoss
from isbi_unet.process import Interrupted, run_main, session, whoami
from isbi_unet.recipes import RECIPES, apply_recipe
from isbi_unet.train_settings import TrainSettings
from isbi_unet.training import (
    NonFiniteLoss,
    append_log,
    evaluate,
    is_best,
    log_row,
    lr_at,
    recompute_bn_stats,
    train_one_epoch,
    training_loader,
)
from unet import UNet

__all__ = ["RECIPES", "main", "parse_args", "resolve_args"]


def parse_args(argv=None):
    """The flags (isbi_unet/train_settings.py), and `given`: the names of those on the command line."""
    values, given = parse(TrainSettings, __doc__, argv)
    return SimpleNamespace(**values, given=given)


def resolve_args(args, cuda, world_size=1):
    """The run's TrainSettings, resolved once and read-only from then on: a resumed run's own from its
    config.json (kept as `original`, with what this resume `changed`), recipe defaults filled, nonsense
    refused before any heavy work."""
    flags, original, changed = {k: v for k, v in vars(args).items() if k != "given"}, None, None
    if flags["resume"]:
        run_dir.check_resume_point(flags["resume"])
        original, flags, changed = run_dir.resumed_flags(flags, getattr(args, "given", ()), world_size)
    flags = apply_recipe(flags, cuda, world_size)
    if original:
        flags["recipe_reason"] = f"the resumed run's: {original.get('recipe_reason')}"
    checkpoint_dir, replace_run = run_dir.checkpoint_dir_for(
        flags["checkpoint_dir"], flags["resume"], flags["data_path"], flags["overwrite"], whoami().rank == 0
    )
    flags.update(world_size=world_size, checkpoint_dir=checkpoint_dir, replace_run=replace_run)
    return TrainSettings(**flags, original=original, changed=changed)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    flow.manual_seed(seed)


def build_dataloaders(s, device):
    """The training DataLoader (this rank's share, augmented) and the held-out slices (or None)."""
    train_names, val_names = split_names(s.data_path, s.val_slices, s.val_start)
    image_dir, label_dir = training_sources(s.data_path)
    # Each rank draws its own crops and flips; the sampler already gives it different slices.
    train_set = SelfDataSet(
        image_dir,
        label_dir,
        train_names,
        augment=True,
        crop_size=s.crop_size,
        seed=s.seed + whoami().rank,
        elastic_sigma=s.elastic_sigma,
        border_weight=s.border_weight,
        samples_per_slice=s.samples_per_slice,
    )
    val_set = SelfDataSet(image_dir, label_dir, val_names) if val_names else None
    pin = device.type == "cuda"
    loader = training_loader(train_set, s.batch_size, s.seed, s.data_path, s.graph, s.num_workers, pin_memory=pin)
    return loader, val_set


def build_engine(s, model, criterion, steps_per_epoch):
    """Adam, the lr schedule and the engine (eager, DDP under the launcher, or nn.Graph)."""
    optimizer = flow.optim.Adam(model.parameters(), lr=s.lr)
    scheduler = None
    if s.schedule == "cosine":
        scheduler = flow.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs * steps_per_epoch)
    if s.graph:
        return GraphEngine(model, criterion, optimizer, scheduler, amp=s.amp)
    return EagerEngine(model, criterion, optimizer, scheduler, distributed=whoami().world > 1)


def load_weights(resume, model, device):
    """--resume's checkpoint with its weights loaded into `model` (None without --resume)."""
    if not resume:
        return None
    checkpoint = load_checkpoint(resume, device)
    if checkpoint["model_config"] != model.config():
        raise DataError(
            f"{resume}: trained as UNet{checkpoint['model_config']}, but this run builds UNet{model.config()}"
        )
    model.load_state_dict(checkpoint["model"])
    return checkpoint


def start_run(s, engine, checkpoint, steps_per_epoch, master_process):
    """Where this run starts: epoch, best V_rand so far, last saved checkpoint; optimizer state from a resume."""
    run = SimpleNamespace(start_epoch=1, best_v_rand=-math.inf, last_saved=None)
    if checkpoint is not None:
        done = checkpoint["epoch"]
        if s.epochs < done:
            raise DataError(f"--epochs {s.epochs} is fewer than the {done} epochs {s.resume} has already trained")
        note = engine.load_state_dict(checkpoint, done * steps_per_epoch, s.lr)
        if note and master_process:
            print(f"note: {s.resume} {note}")
        run.start_epoch, run.last_saved = done + 1, s.resume
        run.best_v_rand = checkpoint.get("best_v_rand", -math.inf)
    return run


def describe_run(s, loader, val_set, device):
    engine = "graph" if s.graph else "eager"
    print(
        f"recipe {s.recipe} ({s.recipe_reason}): width {s.width}, crop {s.crop_size or 'none'}, batch {s.batch_size} "
        f"x {s.world_size} process(es), {s.epochs} epochs, lr {s.lr} {s.schedule}, loss {s.loss}, {engine} on "
        f"{device}\n{len(loader.dataset.images)} training slices x {s.samples_per_slice} sample(s) per epoch, "
        f"{len(val_set) if val_set else 0} validation slices; writing to {s.checkpoint_dir}/",
        flush=True,
    )


def save_epoch(s, engine, run, epoch, train_loss, scores, seconds, steps_per_epoch):
    """Rank 0: log row, then best, then last; a kill between them leaves `last` as the resume point."""
    v_rand = scores.get("v_rand", math.nan)
    best = is_best(v_rand, run.best_v_rand)
    run.best_v_rand = v_rand if best and math.isfinite(v_rand) else run.best_v_rand
    lr = lr_at(s.lr, s.schedule, epoch * steps_per_epoch, s.epochs * steps_per_epoch)
    row = log_row(epoch, train_loss, scores, lr, seconds)
    log_path = os.path.join(s.checkpoint_dir, "log.csv")
    append_log(log_path, row)
    extra = dict(epoch=epoch, best_v_rand=run.best_v_rand, run_args=s.record(), **engine.state_dict())
    if best:
        save_checkpoint(os.path.join(s.checkpoint_dir, "best"), engine.model, **extra)
    run.last_saved = os.path.join(s.checkpoint_dir, "last")
    save_checkpoint(run.last_saved, engine.model, **extra)
    plot_losses(read_log(log_path), os.path.join(s.checkpoint_dir, "loss.png"))
    print(
        f"epoch {epoch:3d}/{s.epochs}  train loss {train_loss:.4f}  val loss {row['val_loss']}  "
        f"V_rand {row['v_rand']}  V_info {row['v_info']}  pixel error {row['pixel_error']}"
        f"{'  *best' if best else ''}  {seconds:.1f}s",
        flush=True,
    )


def best_reason(s, run):
    if math.isfinite(run.best_v_rand):
        return f"validation V_rand {run.best_v_rand:.4f}"
    if not s.val_slices:
        return "the last epoch: --val_slices 0 holds out nothing to score"
    return "the last epoch: no epoch had a finite validation V_rand, as no held-out label has a cell (255) pixel"


def main(argv=None):
    """Trains and returns the model (every rank returns its replica)."""
    args = parse_args(argv)
    device = select_device(args.device, whoami().local_rank)
    # Ctrl-C, SIGTERM and a stalled job (isbi_unet/process); run_dir.held: the run folder stays locked till the end
    with session(device, args.step_timeout) as process, run_dir.held():
        return train(args, device, process)


def train(args, device, process):
    """main() once the signals are ours; a failed write or a NaN stops naming what is left to resume from."""
    s = resolve_args(args, device.type == "cuda", whoami().world)
    master_process = whoami().rank == 0
    seed_all(s.seed)

    loader, val_set = build_dataloaders(s, device)
    model = UNet(n_channels=1, n_classes=1, bilinear=s.bilinear, width=s.width).to(device)
    criterion = SegmentationLoss(s.loss)
    checkpoint = load_weights(s.resume, model, device)  # before DDP broadcasts rank 0's weights
    engine = build_engine(s, model, criterion, len(loader))
    run = start_run(s, engine, checkpoint, len(loader), master_process)
    if run.start_epoch > s.epochs:
        if master_process:
            print(f"note: {s.resume} already finished all {s.epochs} epochs; continue it with --epochs N above that")
        return model
    process.saved(run.last_saved)
    try:
        if master_process:
            run_dir.prepare_run_dir(s.checkpoint_dir, s.replace_run, run.start_epoch - 1)
            config = os.path.join(s.checkpoint_dir, "config.json")
            run_dir.write_config(config, s.record(), s.data_path, device, s.original, s.changed)
            describe_run(s, loader, val_set, device)
        for epoch in range(run.start_epoch, s.epochs + 1):
            process.tick(epoch, 0)  # a signal during start-up, or during the previous epoch's validation or save
            t0 = time.time()
            train_loss = train_one_epoch(engine, loader, epoch, s.epochs, s.seed, device, process.tick)
            if s.bn_slices:
                recompute_bn_stats(model, loader.dataset.images, s.bn_slices, s.batch_size, device)
            scores = evaluate(engine, val_set, criterion, device, epoch) if val_set else {}
            if master_process:
                with process.saving():  # a second Ctrl-C waits for the checkpoints to be written
                    run_dir.record_files(s.checkpoint_dir, saving=True)
                    save_epoch(s, engine, run, epoch, train_loss, scores, time.time() - t0, len(loader))
                    run_dir.record_files(s.checkpoint_dir)  # what a later run may replace: these bytes
            run.last_saved = os.path.join(s.checkpoint_dir, "last")  # every rank names it, rank 0 wrote it
            process.saved(run.last_saved)
        if process.stop_requested():  # during the last epoch's validation or save, which were let finish
            raise Interrupted(f"interrupted after the last epoch was saved; the run in {s.checkpoint_dir}/ is complete")
    except NonFiniteLoss as e:
        raise DataError(f"{e}; stopped, {saved_note(run.last_saved)}") from None
    except WriteError as e:
        raise WriteError(f"{e}; {saved_note(run.last_saved)}") from None
    if master_process:
        print(f"done: best checkpoint {os.path.join(s.checkpoint_dir, 'best')} ({best_reason(s, run)})")
    return model


if __name__ == "__main__":
    run_main(main, session=True)
