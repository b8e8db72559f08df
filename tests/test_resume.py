"""Interruption: a training process SIGKILLed mid-epoch resumes where it stopped; a NaN loss stops a
run without touching its last good checkpoint; a checkpoint swap cut short still loads."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY, assert_fails, run, snapshot, train_script, write_dataset


def read_epochs(log):
    with open(log, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def weights(checkpoint):
    from isbi_unet.checkpoint import load_checkpoint

    state = load_checkpoint(str(checkpoint))
    return state["epoch"], {k: v.numpy() for k, v in state["model"].items()}


def start_training(*args):
    cmd = [sys.executable, "TrainUnetDataSet.py", *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epoch_line(proc, epoch, timeout=300):
    """Reads stdout up to the summary line of `epoch`, printed once its checkpoint is saved."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        match = re.match(rf"epoch +{epoch}/\d+ .* ([\d.]+)s$", line.strip())
        if match:
            return float(match.group(1))
        assert time.time() < deadline, "training too slow"
    raise AssertionError(f"training ended before epoch {epoch}: {proc.wait()} {proc.stderr.read()}")


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    # 38 training slices in batches of 2: an epoch of 19 steps, long enough to be killed inside.
    data = write_dataset(str(tmp_path / "data"), n_train=40, n_test=1)
    flags = ["--data_path", f"{data}/train", "--epochs", 4, *TINY]
    run("TrainUnetDataSet.py", *flags, "--checkpoint_dir", tmp_path / "straight")

    ckpt = tmp_path / "ckpt"
    proc = start_training(*flags, "--checkpoint_dir", ckpt)
    epoch_seconds = wait_for_epoch_line(proc, 1)
    time.sleep(epoch_seconds / 4)  # a few of epoch 2's 19 steps, however fast this machine is
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # it was still running: killed, not finished
    assert read_epochs(ckpt / "log.csv") == [1]  # and epoch 2 had not ended
    assert weights(ckpt / "last")[0] == 1

    out = run("TrainUnetDataSet.py", *flags, "--checkpoint_dir", ckpt, "--resume", ckpt / "last").stdout
    assert re.findall(r"epoch +(\d+)/4", out) == ["2", "3", "4"]
    assert read_epochs(ckpt / "log.csv") == [1, 2, 3, 4]
    epoch, resumed = weights(ckpt / "last")
    _, straight = weights(tmp_path / "straight" / "last")
    assert epoch == 4 and resumed.keys() == straight.keys()
    worst = max(float(np.abs(resumed[k] - straight[k]).max()) for k in resumed)
    print(f"largest weight difference, resumed vs uninterrupted: {worst}")
    assert worst == 0.0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = ["--data_path", f"{data}/train", "--checkpoint_dir", ckpt, *TINY]
    run("TrainUnetDataSet.py", *flags, "--epochs", 1)
    good = {p: b for p, b in snapshot(ckpt).items() if "/best/" in p or "/last/" in p}
    # Adam moves every weight by about lr per step: with lr 1e10 the second step's logits overflow. A resumed
    # run takes its lr from config.json, so the run's record is what is raised.
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(config, lr=1e10)))
    proc = run("TrainUnetDataSet.py", *flags, "--epochs", 3, "--resume", ckpt / "last", check=False)
    assert_fails(proc, f"epoch 2 step 2: loss is nan; stopped, last good checkpoint is {ckpt / 'last'}")
    assert {p: b for p, b in snapshot(ckpt).items() if "/best/" in p or "/last/" in p} == good
    assert read_epochs(ckpt / "log.csv") == [1]


def test_nan_loss_in_the_first_epoch_saves_nothing(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = train_script(f"{data}/train", ckpt, "--lr", 1e10, epochs=2, check=False)
    assert_fails(proc, "epoch 1 step 2: loss is nan; stopped, no checkpoint was saved")
    assert not (ckpt / "last").exists() and not (ckpt / "best").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    import oneflow as flow

    from isbi_unet.checkpoint import save_checkpoint
    from isbi_unet.errors import DataError
    from unet import UNet

    model = UNet(width=4)
    save_checkpoint(str(tmp_path / "last"), model, epoch=1)
    before = snapshot(tmp_path)
    with flow.no_grad():
        model.outc.conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"last: not saved, outc.conv.weight holds NaN or inf"):
        save_checkpoint(str(tmp_path / "last"), model, epoch=2)
    assert snapshot(tmp_path) == before


def test_a_save_cut_short_between_its_renames_still_loads(tmp_path, monkeypatch):
    # The one moment a kill leaves no `last`: the old checkpoint moved to .last.old, the new one not yet
    # in place. Simulated by failing the second rename; load and the next save must both cope.
    from isbi_unet.checkpoint import load_checkpoint, save_checkpoint
    from unet import UNet

    model = UNet(width=4)
    last = str(tmp_path / "last")
    save_checkpoint(last, model, epoch=1)
    real_rename = os.rename

    def rename(src, dst):
        if dst == last:
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(last, model, epoch=2)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not os.path.exists(last)
    assert load_checkpoint(last)["epoch"] == 1  # from .last.old
    save_checkpoint(last, model, epoch=3)
    assert load_checkpoint(last)["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no .last.old or .last.tmp left behind


def test_each_epoch_reseeds_the_global_generators_from_seed_rank_and_epoch():
    import random

    import oneflow as flow

    from isbi_unet.training import seed_epoch

    def draws(seed, rank, epoch):
        seed_epoch(seed, rank, epoch)
        return random.random(), float(np.random.rand()), flow.rand(3).numpy().tolist()

    first = draws(0, 0, 5)
    draws(0, 0, 4)
    assert draws(0, 0, 5) == first
    for other in (draws(0, 0, 6), draws(0, 1, 5), draws(1, 0, 5)):
        assert all(a != b for a, b in zip(other, first))
