"""The parts of a training run: the data loader, one epoch, precise BatchNorm statistics, validation, and the run's log.

Every function works the same on one process and under the launcher: ranks share the work and sum
their results, so every rank ends with the same numbers.
"""

import contextlib
import csv
import math
import os
import random
import sys

import numpy as np
import oneflow as flow
from tqdm import tqdm

from isbi_unet.errors import DataError, atomic_write, cannot_write
from isbi_unet.figures import log_rows
from isbi_unet.formats import LOG_COLUMNS, METRICS, POOL
from isbi_unet.images import evenly_spaced
from isbi_unet.metrics import THRESHOLDS, pixel_error, score_curve
from isbi_unet.process import runtime


class NonFiniteLoss(ArithmeticError):
    """A NaN or inf loss; the message says where."""


def all_reduce_sum(values, device):
    """Sums a list of floats over all ranks (a no-op on one process)."""
    t = flow.tensor(values, dtype=flow.float64, device=device)
    if runtime.whoami().world > 1:
        flow.comm.all_reduce(t)
    return t.numpy().tolist()


def check_finite(loss_value, epoch, step, device):
    """Raises NonFiniteLoss on every rank when any rank's loss is NaN or inf.

    A collective, so that a rank which alone sees it does not stop alone: it would leave the others
    waiting in the next step's all_reduce, and rank 0, the one that prints, would say nothing of why.
    """
    bad = not math.isfinite(loss_value)
    world_size = runtime.whoami().world
    ranks = int(all_reduce_sum([float(bad)], device)[0]) if world_size > 1 else int(bad)
    if ranks:
        where = f" on {ranks} of {world_size} processes" if world_size > 1 else ""
        raise NonFiniteLoss(f"epoch {epoch} step {step}: loss is {loss_value if bad else 'not finite'}{where}")


def seed_epoch(seed, rank, epoch):
    """Seeds Python's, NumPy's and OneFlow's global generators from (seed, rank, epoch).

    Called at the start of every epoch, so what an epoch draws depends on nothing before it and a
    resumed run needs no generator state from its checkpoint. Saving the states instead does not work
    with OneFlow 0.9.0: flow.get_rng_state()/set_rng_state() round-trip only until the first random op
    after manual_seed (measured: set_rng_state(get_rng_state()) then flow.rand gives a third stream).
    The dataset's crops and flips follow the same rule (Slices.set_epoch). Ranks differ, so
    anything random per sample (dropout, say) differs between DDP replicas as it should.
    """
    derived = int(np.random.SeedSequence((seed, rank, epoch)).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    flow.manual_seed(derived)


def epoch_bar(epoch, epochs, images, enabled=True, world_size=1):
    """A tqdm bar over the `images` this rank trains on; under DDP it counts all ranks' images.

    Only on a terminal: in a log file or CI output a bar is a stream of carriage returns, and the
    epoch's summary line says the same.
    """
    return tqdm(
        total=images,
        desc=f"epoch {epoch}/{epochs}",
        unit="img",
        leave=False,
        dynamic_ncols=True,
        unit_scale=world_size if world_size > 1 else False,
        disable=not (enabled and sys.stderr.isatty()),
        file=sys.stderr,
    )


def train_one_epoch(engine, loader, epoch, epochs, seed, device, tick=None):
    """One pass over this rank's share of the slices; returns the mean loss over all ranks.

    tick(epoch, step): called after every step (the session's: a stop request or a stalled job ends the run there).
    """
    rank, _, world_size, _ = runtime.whoami()
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    seed_epoch(seed, rank, epoch)  # so a resumed run draws what an uninterrupted one would
    engine.model.train()
    loss_sum, count = 0.0, 0
    with epoch_bar(epoch, epochs, len(loader.sampler), rank == 0, world_size) as progress:
        for step, batch in enumerate(loader, 1):
            batch = [t.to(device) for t in batch]
            loss_value = engine.train_step(*batch).item()
            check_finite(loss_value, epoch, step, device)
            loss_sum += loss_value * batch[0].shape[0]
            count += batch[0].shape[0]
            progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            progress.update(batch[0].shape[0])
            if tick is not None:
                tick(epoch, step)
    loss_sum, count = all_reduce_sum([loss_sum, count], device)
    return loss_sum / count


def recompute_bn_stats(model, images, count, batch_size, device):
    """Sets every BatchNorm's running mean and variance to its statistics over `count` whole training slices.

    The running averages training leaves behind follow the last few batches of augmented crops, which
    scores held-out slices far worse than whole-slice statistics do ("precise BN"; docs/quality.md).
    Slices are spread evenly over the training set and shared between ranks, and every rank ends with
    the same statistics, so no rank's last batch decides what is saved. Slices may differ in size: each
    batch's statistics are weighted by its pixel count.
    """
    rank, _, world_size, _ = runtime.whoami()
    bns = [m for m in model.modules() if isinstance(m, flow.nn.BatchNorm2d)]
    mine = evenly_spaced(len(images), count)[rank::world_size]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 1.0  # each forward replaces the running statistics with its own batch's
    model.train()
    weight, sums = 0.0, np.zeros(2 * sum(b.num_features for b in bns))
    with flow.no_grad():
        for batch in same_size_batches([images[i] for i in mine], batch_size):
            model.forward(flow.tensor(batch, device=device))  # .forward: no DDP buffer broadcast
            stats = []
            for b in bns:
                mean = b.running_mean.numpy().astype(np.float64)
                stats += [mean, b.running_var.numpy() + mean**2]
            sums += batch.size * np.concatenate(stats)
            weight += batch.size
    for b, momentum in zip(bns, momenta):
        b.momentum = momentum
    totals = all_reduce_sum([weight, *sums], device)
    moments, offset = np.array(totals[1:]) / totals[0], 0
    for b in bns:
        c = b.num_features
        mean, square = moments[offset : offset + c], moments[offset + c : offset + 2 * c]
        offset += 2 * c
        b.running_mean.copy_(flow.tensor(mean, dtype=flow.float32, device=device))
        b.running_var.copy_(flow.tensor(np.maximum(square - mean**2, 0.0), dtype=flow.float32, device=device))


def same_size_batches(arrays, batch_size):
    """Consecutive arrays stacked in batches of up to `batch_size`, a new batch wherever the size changes."""
    batch = []
    for array in arrays:
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(array)
    if batch:
        yield np.stack(batch)


def evaluate(engine, val_set, criterion, device, epoch):
    """Validation loss, V_rand, V_info and pixel error over the whole held-out slices.

    Ranks share the slices and sum their results; `engine.infer` runs no collective, so they may
    score different numbers of slices.
    """
    rank, _, world_size, _ = runtime.whoami()
    engine.model.eval()
    if world_size > 1:
        # Each rank's last training forward updated its own BatchNorm statistics; score with rank 0's.
        for buffer in engine.model.buffers():
            flow.comm.broadcast(buffer, 0)
    loss_sum, error_sum, scored, curves = 0.0, 0.0, 0, np.zeros((len(THRESHOLDS), 2))
    with flow.no_grad():
        for i in range(rank, len(val_set), world_size):
            image, label = val_set.images[i], val_set.labels[i]
            logits = engine.infer(flow.tensor(image[None], device=device))
            loss_sum += criterion(logits, flow.tensor(label[None], device=device)).item()
            prob, label255 = flow.sigmoid(logits)[0, 0].numpy(), label[0] * 255
            curve = score_curve(prob, label255)
            if np.all(np.isfinite(curve)):  # a label without cells has no score (metrics.mean_curve)
                curves += curve
                scored += 1
            error_sum += pixel_error(prob, label255)
    totals = all_reduce_sum([loss_sum, error_sum, scored, *curves.ravel()], device)
    n = len(val_set)
    if not math.isfinite(totals[0]):
        raise NonFiniteLoss(f"epoch {epoch}: validation loss is {totals[0] / n}")
    curve = np.array(totals[3:]).reshape(-1, 2) / totals[2] if totals[2] else np.full((len(THRESHOLDS), 2), np.nan)
    v_rand, v_info = float(curve[:, 0].max()), float(curve[:, 1].max())
    return dict(val_loss=totals[0] / n, v_rand=v_rand, v_info=v_info, pixel_error=totals[1] / n)


def lr_at(lr, schedule, step, total_steps):
    """The learning rate after `step` optimizer steps (the value both schedules follow)."""
    if schedule == "constant":
        return lr
    return lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2


def append_log(path, row):
    """Appends `row` (and the header to a new log); a failed write (disk full) leaves the log as it was."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if not size:
                writer.writeheader()
            writer.writerow(row)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)  # no half row for a resumed run to read
        raise cannot_write(path, e) from None


def truncate_log(path, last_epoch):
    """Drops log rows of epochs after `last_epoch` (all rows for 0): what a resumed run redoes. A log saved by a
    spreadsheet is rewritten as training writes it; one whose columns were changed is refused in one line."""
    if not os.path.exists(path):
        return
    header, rows = log_rows(path)
    if tuple(header) != LOG_COLUMNS:
        raise DataError(
            f"{path}: its columns ({', '.join(header)}) are not the ones training writes ({', '.join(LOG_COLUMNS)}); "
            "restore them, or move the log away to start a new one"
        )
    rows = [r for r in rows if int(r["epoch"]) <= last_epoch]
    if not rows:
        os.remove(path)
        return
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:  # one rename: a kill must not lose the log
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def log_row(epoch, train_loss, scores, lr, seconds):
    """One log.csv row: the epoch's losses and scores (nan where none was scored), lr after it and its time."""
    row = dict(epoch=epoch, train_loss=f"{train_loss:.5f}")
    row.update({k: f"{scores.get(k, math.nan):.5f}" for k in ("val_loss", *METRICS)})
    return dict(row, lr=f"{lr:.3g}", seconds=f"{seconds:.1f}")


def is_best(v_rand, best_v_rand):
    """Whether an epoch scoring `v_rand` is the best so far: the highest finite V_rand; until there is
    one (no held-out block, or labels without cells) every epoch is, so `best` follows `last`."""
    return v_rand > best_v_rand if math.isfinite(v_rand) else not math.isfinite(best_v_rand)


def training_loader(train_set, batch_size, seed, where, graph=False, num_workers=0, pin_memory=False):
    """A DataLoader over this rank's share of `train_set` (DistributedSampler), shuffled per epoch.

    Refuses, naming the data folder `where`, whole slices of different sizes in one batch and an epoch without a batch.
    """
    check_whole_slices_batch(train_set, batch_size, graph, where)
    rank, _, world_size, _ = runtime.whoami()
    sampler = flow.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    side = train_set.crop_size or min(min(image.shape[1:]) for image in train_set.images)
    drop_last = drop_last_batch(len(sampler), batch_size, side, graph)
    loader = flow.utils.data.DataLoader(
        train_set, batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory
    )
    if len(loader) == 0:
        raise DataError(
            f"{where}: {len(train_set)} training sample(s) per epoch over all processes "
            f"give no full batch of --batch_size {batch_size}"
        )
    return loader


def drop_last_batch(samples, batch_size, side, graph):
    """Whether each epoch drops its short last batch: a graph is compiled for one batch shape, and one
    sample at a 1x1 bottleneck (sides below 2 * POOL) gives BatchNorm one value per channel, whose
    variance is no statistic (NaN running variance). Otherwise every sample trains."""
    return graph or (samples % batch_size == 1 and side < 2 * POOL)


def check_whole_slices_batch(train_set, batch_size, graph, where):
    """Whole slices of different sizes cannot share a batch, nor one compiled graph: say so before training."""
    sizes = sorted({image.shape[1:] for image in train_set.images})
    if train_set.crop_size or len(sizes) == 1 or (batch_size == 1 and not graph):
        return
    (h1, w1), (h2, w2) = sizes[0], sizes[-1]
    raise DataError(
        f"{where}: training slices differ in size ({w1}x{h1} ... {w2}x{h2}), so whole slices cannot "
        "be batched; train on crops (--crop_size N) or, in eager mode, with --batch_size 1"
    )
