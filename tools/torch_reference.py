"""The CPU recipe in PyTorch, for screening recipe changes about 5x faster than OneFlow's CPU path allows.

    PY=/path/to/python-with-torch
    $PY tools/torch_reference.py --steps 260 --seed 0 --tta         # the OneFlow default's length
    $PY tools/torch_reference.py --steps 1200 --eval_every 300      # about 20 min on 2 cores
    $PY tools/torch_reference.py --elastic 0 --no_jitter --seed 1   # an ablation
    $PY tools/torch_reference.py --val_start 10 --threads 1         # hold out slices 10-14
    $PY tools/torch_reference.py --seed 1 --save_prob runs/s1       # keep the maps (evaluate.py scores them)
    $PY tools/torch_reference.py --steps 2400 --eval_every 300 --score_train   # fit vs held-out

Needs torch, numpy and opencv-python-headless, not OneFlow: it runs this repo's own data pipeline
(`isbi_unet.dataset`, `isbi_unet.augment`) and inference (`isbi_unet.tiling`), the U-Net of
tools/torch_unet.py (= unet.py), BCE + soft Dice, Adam with a per-step cosine decay, precise BatchNorm
statistics from 8 training slices, and scores the held-out block (by default the last 5 slices of
data/train) with `isbi_unet.metrics.evaluate_slices`, as TrainUnetDataSet.py's validation does.
Prints one JSON line. Its numbers screen ideas; only a OneFlow run (`bash train.sh ...`) decides a default.
"""

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from isbi_unet import dataset, images, metrics, tiling  # noqa: E402  (the framework-free core)
from isbi_unet.process import run_main  # noqa: E402
from isbi_unet.recipes import RECIPES  # noqa: E402
from tools.torch_unet import torch_unet  # noqa: E402

CPU = RECIPES["cpu"]  # the recipe this script screens changes to


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(REPO, "data", "train"), help="folder holding image/ and label/")
    p.add_argument("--val_slices", type=int, default=5, help="hold out and score N neighbouring slices")
    p.add_argument(
        "--val_start",
        type=int,
        default=-1,
        help="first slice of the held-out block (-1 = the last N), as TrainUnetDataSet.py's --val_start",
    )
    p.add_argument("--steps", type=int, default=260, help="training steps (the OneFlow CPU default runs 260)")
    p.add_argument("--lr", type=float, default=CPU["lr"], help="Adam learning rate")
    p.add_argument("--batch", type=int, default=CPU["batch_size"], help="crops per step")
    p.add_argument("--crop", type=int, default=CPU["crop_size"], help="side of the random square crops")
    p.add_argument("--width", type=int, default=CPU["width"], help="channels of the first U-Net level")
    p.add_argument("--elastic", type=float, default=10, help="elastic deformation sigma in px (0 = off)")
    p.add_argument(
        "--clahe",
        action="store_true",
        help="contrast-limited adaptive histogram equalisation (clip 2, 8x8 tiles) before standardising, "
        "in training and scoring",
    )
    p.add_argument(
        "--neighbours",
        action="store_true",
        help="2.5D: the slices above and below as two more input channels (mirrored at the ends of each split's "
        "runs of slices, so held-out images never enter training); scores without TTA",
    )
    p.add_argument("--no_jitter", action="store_true", help="switch the intensity jitter off")
    p.add_argument(
        "--loss",
        choices=["bce", "bce_dice", "bce_cldice"],
        default="bce_dice",
        help="training loss (bce_cldice: BCE + half soft Dice + half clDice on the membrane class, Shit et al. 2021)",
    )
    p.add_argument(
        "--topk",
        type=float,
        default=0,
        help="average the BCE term over only this fraction of each batch's pixels, the hardest (largest BCE); "
        "0 = all pixels",
    )
    p.add_argument(
        "--norm",
        choices=["bn", "gn"],
        default="bn",
        help="normalisation after each convolution: BatchNorm (unet.py's, with precise BN) or GroupNorm with 8 groups "
        "(the same at training and scoring)",
    )
    p.add_argument(
        "--cldice_iter", type=int, default=10, help="soft-skeleton iterations of clDice (> half the thickest membrane)"
    )
    p.add_argument("--border_weight", type=float, default=0, help="w0 of the paper's border weight map (0 = off)")
    p.add_argument(
        "--schedule",
        choices=["cosine", "poly", "constant"],
        default="cosine",
        help="learning rate over the run: cosine decay to 0, poly (1 - step/steps)^0.9, or constant",
    )
    p.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="Adam, or the U-Net paper's SGD with --momentum"
    )
    p.add_argument(
        "--momentum", type=float, default=0.99, help="SGD momentum (the paper's 0.99); only with --optimizer sgd"
    )
    p.add_argument(
        "--ema", type=float, default=0, help="also score an exponential moving average of the weights with this decay"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    p.add_argument("--tta", action="store_true", help="also score with 8-fold test-time averaging")
    p.add_argument("--eval_every", type=int, default=0, help="also print scores every N steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--score_train",
        action="store_true",
        help="also score the training slices themselves (whole, unaugmented): how well the model fits what it "
        "trained on",
    )
    p.add_argument(
        "--save_prob",
        default="",
        help="also write the last step's held-out cell probabilities (no TTA) as DIR/NAME.png (x 255, as "
        "predict_unet_test.py's prob/), for evaluate.py",
    )
    return p.parse_args(argv)


def cldice_loss(pred, target, iters, eps=1.0):
    """1 - clDice (Shit et al., CVPR 2021): penalises gaps in the predicted membrane network."""
    import torch.nn.functional as F

    erode = lambda x: -F.max_pool2d(-x, 3, 1, 1)
    open_ = lambda x: F.max_pool2d(erode(x), 3, 1, 1)

    def skeleton(x):
        skel = F.relu(x - open_(x))
        for _ in range(iters):
            x = erode(x)
            delta = F.relu(x - open_(x))
            skel = skel + F.relu(delta - skel * delta)
        return skel

    sp, st = skeleton(pred), skeleton(target)
    precision = ((sp * target).sum() + eps) / (sp.sum() + eps)
    sensitivity = ((st * pred).sum() + eps) / (st.sum() + eps)
    return 1 - 2 * precision * sensitivity / (precision + sensitivity)


def stack_neighbours(ds, all_names):
    """Turn each 1xHxW slice of `ds` into 3xHxW (slice above, slice, slice below), within `ds`'s own runs
    of consecutive slices, mirrored at their ends (augment.elastic_deform warps all three alike)."""
    position = [all_names.index(n) for n in ds.names]
    old = list(ds.raw)
    for k, pos in enumerate(position):
        before = k > 0 and position[k - 1] == pos - 1
        after = k + 1 < len(position) and position[k + 1] == pos + 1
        up = k - 1 if before else k + 1 if after else k
        down = k + 1 if after else k - 1 if before else k
        ds.raw[k] = np.concatenate([old[up], old[k], old[down]])
    ds.images = [
        images.standardize(x) for x in ds.raw
    ]  # the stack standardised as one, as training's augment path does


def main(argv=None):
    import torch
    import torch.nn.functional as F

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.no_jitter:
        dataset.intensity_jitter = lambda x, rng: x
    if a.clahe:
        import cv2

        clahe, to_unit = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)), dataset.to_unit
        dataset.to_unit = lambda img: to_unit(clahe.apply(img))
    image_dir, label_dir = os.path.join(a.data_path, "image"), os.path.join(a.data_path, "label")
    names = images.list_images(image_dir)
    train_names, held = images.held_out_block(names, a.val_slices, a.val_start, a.data_path)
    train = dataset.Slices(
        image_dir,
        label_dir,
        names=train_names,
        augment=True,
        crop_size=a.crop,
        seed=a.seed,
        elastic_sigma=a.elastic,
        border_weight=a.border_weight,
        samples_per_slice=CPU["samples_per_slice"],
    )
    val = dataset.Slices(image_dir, label_dir, names=held)
    # The training set's .images/.labels are its whole, unaugmented slices (augmentation happens per item).
    seen = train if a.score_train else None
    model = torch_unet(a.width)
    if a.norm == "gn":  # evaluate()'s precise BN then finds no BatchNorm and leaves the model as trained
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(module, name, torch.nn.GroupNorm(8, child.num_features))
    if a.neighbours:
        stack_neighbours(train, names)
        stack_neighbours(val, names)
        model.inc[0] = torch.nn.Conv2d(3, a.width, 3, padding=1, bias=False)
    ema = copy.deepcopy(model) if a.ema else None
    if a.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=a.lr)

    def loss_fn(logits, label, weight=None):
        bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        if weight is not None:
            bce = bce * weight
        if a.topk:
            bce = bce.flatten().topk(max(1, int(a.topk * bce.numel()))).values
        loss = bce.mean()
        if a.loss == "bce":
            return loss
        membrane, target = 1 - torch.sigmoid(logits), 1 - label
        dice = 1 - (2 * (membrane * target).sum() + 1) / (membrane.sum() + target.sum() + 1)
        if a.loss == "bce_dice":
            return loss + dice
        return loss + 0.5 * dice + 0.5 * cldice_loss(membrane, target, a.cldice_iter)

    def evaluate(net, tta):
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # a plain average over the slices below: precise BN
        net.train()
        with torch.no_grad():
            for i in images.evenly_spaced(len(train.images), 8):
                net(torch.from_numpy(train.images[i][None]))
            net.eval()
            forward = lambda batch: torch.sigmoid(net(torch.from_numpy(batch))).numpy()

            def predict(ds, tta):
                # Whole slices, as predict_unet_test.py's default (--tile 0) and its TTA.
                if a.neighbours:  # predict_tiled takes 1xHxW; ISBI's 512x512 passes whole (a multiple of 16)
                    return [forward(img[None])[0, 0] for img in ds.images]
                return [tiling.predict_tiled(forward, img, tile=0, tta=tta)[0] for img in ds.images]

            last_probs[:] = predict(val, tta)
            seen_probs = predict(seen, False) if seen is not None else None
        net.train()
        for b in bns:
            b.momentum = 0.1
        scores = score(last_probs, val)
        if seen is not None:
            scores["train"] = score(seen_probs, seen)
        return scores

    def score(probs, ds):
        labels = [(label[0] * 255).astype(np.uint8) for label in ds.labels]
        return {k: round(v, 4) for k, v in metrics.evaluate_slices(probs, labels).items()}

    last_probs = []
    step, epoch, t0 = 0, 0, time.time()
    model.train()
    while step < a.steps:
        train.set_epoch(epoch)
        order = np.random.default_rng((a.seed, epoch)).permutation(len(train))
        for s in range(0, len(order) - a.batch + 1, a.batch):
            if step >= a.steps:
                break
            arrays = [torch.from_numpy(np.stack(z)) for z in zip(*(train[i] for i in order[s : s + a.batch]))]
            lr = (
                a.lr
                * {
                    "cosine": 0.5 * (1 + np.cos(np.pi * step / a.steps)),
                    "poly": (1 - step / a.steps) ** 0.9,
                    "constant": 1.0,
                }[a.schedule]
            )
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_fn(model(arrays[0]), *arrays[1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.mul_(a.ema).add_(pm, alpha=1 - a.ema)
            if a.eval_every and step % a.eval_every == 0 and step < a.steps:
                print(json.dumps(dict(step=step, loss=round(loss.item(), 4), **evaluate(model, False))), flush=True)
        epoch += 1
    out = dict(steps=a.steps, seconds=round(time.time() - t0), **evaluate(model, False))
    if a.save_prob:
        import cv2

        os.makedirs(a.save_prob, exist_ok=True)
        for name, prob in zip(held, last_probs):
            cv2.imwrite(
                os.path.join(a.save_prob, os.path.splitext(name)[0] + ".png"), np.round(prob * 255).astype(np.uint8)
            )
    if a.tta:
        out["tta"] = evaluate(model, True)
    if ema is not None:
        out["ema"] = evaluate(ema, False)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    run_main(main)
