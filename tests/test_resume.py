"""Interruption: a training process SIGKILLed mid-epoch resumes where it stopped; a NaN loss stops a
run without touching its last good checkpoint; a checkpoint swap cut short still loads."""

import csv
import json
import math
import os
import re
import shutil
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


# --- a resumed run keeps its settings ------------------------------------------------------------


def resume(checkpoint, *flags, cwd=REPO, check=True):
    """`TrainUnetDataSet.py --resume CHECKPOINT FLAGS...` as a user types it: no other flag, from `cwd`."""
    cmd = [sys.executable, os.path.join(REPO, "TrainUnetDataSet.py"), "--resume", *map(str, [checkpoint, *flags])]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    "flag,value,theirs",
    [
        ("--width", 8, 4),
        ("--crop_size", 48, 32),
        ("--loss", "bce", "bce_dice"),
        ("--val_slices", 3, 2),
        ("--val_start", 0, -1),
        ("--bilinear", None, False),
    ],
)
def test_a_flag_that_changes_what_is_trained_is_refused_naming_both_values(trained, flag, value, theirs):
    before = snapshot(trained)
    proc = resume(trained / "last", "--epochs", 2, flag, *([] if value is None else [value]), check=False)
    given = f"{flag} {True if value is None else value}"
    assert_fails(proc, f"{given} differs from the run's {theirs}", trained / "config.json")
    assert snapshot(trained) == before


def test_other_data_is_refused_and_the_same_data_elsewhere_continues(trained, tmp_path):
    other = write_dataset(str(tmp_path / "other"), seed=1)  # same names and sizes, other pixels
    before = snapshot(trained)
    proc = resume(trained / "last", "--epochs", 2, "--data_path", f"{other}/train", check=False)
    assert_fails(proc, f"--data_path {other}/train differs from the run's {config_of(trained)['data_path']}")
    assert snapshot(trained) == before

    moved = write_dataset(str(tmp_path / "moved"))  # the run's data (write_dataset's seed 0), another folder
    resume(trained / "last", "--epochs", 2, "--data_path", f"{moved}/train")
    assert config_of(trained)["resumed"][0]["changed"]["data_path"][1] == f"{moved}/train"


def test_more_epochs_are_recorded_beside_the_original_settings(trained, tmp_path):
    original = config_of(trained)
    out = resume(trained / "last", "--epochs", 3, cwd=tmp_path).stdout  # elsewhere: data/train is not the run's
    assert re.findall(r"epoch +(\d+)/3", out) == ["2", "3"] and "4 training slices" in out
    assert read_epochs(trained / "log.csv") == [1, 2, 3]
    config = config_of(trained)
    kept = {k: v for k, v in config.items() if k not in ("resumed", "files")}  # "files": what the run wrote, so far
    assert kept == {k: v for k, v in original.items() if k != "files"}  # nothing of the first run lost
    (entry,) = config["resumed"]
    assert entry["changed"]["epochs"] == [1, 3] and "--epochs 3" in entry["command"] and entry["utc"]

    # and resumed again with no flag at all, the run is finished: a note, nothing written
    before = snapshot(trained)
    out = resume(trained / "last").stdout
    assert "already finished all 3 epochs" in out and "done:" not in out
    assert snapshot(trained) == before


def test_fewer_epochs_than_done_says_so_and_writes_nothing(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt, epochs=2)
    before = snapshot(ckpt)
    assert_fails(
        resume(ckpt / "last", "--epochs", 1, check=False), "--epochs 1 is fewer than the 2 epochs", ckpt / "last"
    )
    assert snapshot(ckpt) == before


def test_resume_after_a_run_without_validation_keeps_training_on_every_slice(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt, "--val_slices", 0)
    out = resume(ckpt / "last", "--epochs", 2).stdout  # the default --val_slices 5 would leave 1 slice
    assert "6 training slices x 1 sample(s) per epoch, 0 validation slices" in out
    assert read_epochs(ckpt / "log.csv") == [1, 2]


def test_resume_finds_data_given_relative_to_where_the_run_started(tmp_path):
    start = tmp_path / "start"
    write_dataset(str(start / "mydata"))
    flags = ["--data_path", "mydata/train", "--epochs", 1, "--checkpoint_dir", "ckpt", *TINY]
    cmd = [sys.executable, os.path.join(REPO, "TrainUnetDataSet.py"), *map(str, flags)]
    subprocess.run(cmd, cwd=start, check=True, capture_output=True)
    out = resume(start / "ckpt" / "last", "--epochs", 2).stdout  # from the repo, where data/train is another folder
    assert "4 training slices" in out and read_epochs(start / "ckpt" / "log.csv") == [1, 2]


def test_a_last_batch_of_one_at_a_1x1_bottleneck_trains_without_nan(tmp_path):
    # 5 training slices in batches of 2 leave one 16x16 crop: BatchNorm would see one value per channel.
    data = write_dataset(str(tmp_path / "data"), n_train=7, n_test=1)
    train_script(f"{data}/train", tmp_path / "ckpt", "--crop_size", 16, epochs=2)
    with open(tmp_path / "ckpt" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss"))


def test_a_checkpoint_copied_alone_resumes_with_the_settings_it_holds(trained, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(trained / "last", alone / "last")  # as copied to another node, without config.json
    assert_fails(
        resume(alone / "last", "--width", 8, check=False), "--width 8 differs from the run's 4", alone / "last"
    )
    out = resume(alone / "last", "--epochs", 2).stdout
    assert "width 4, crop 32, batch 2" in out and "4 training slices" in out
    assert read_epochs(alone / "log.csv") == [2]


def test_another_number_of_processes_is_warned_of_and_recorded(tmp_path, capsys):
    from isbi_unet.run_dir import resumed_flags

    run = {"data_path": "data/train", "cwd": str(tmp_path), "width": 4, "epochs": 2, "world_size": 1}
    (tmp_path / "config.json").write_text(json.dumps(run))
    flags = {"resume": str(tmp_path / "last"), "data_path": "data/train", "width": None, "epochs": 5}
    record, kept, changed = resumed_flags(flags, {"resume", "epochs"}, world_size=2)
    assert record == run and kept["width"] == 4 and kept["data_path"] == str(tmp_path / "data/train")
    assert changed == {"epochs": [2, 5], "world_size": [1, 2]}
    assert "trained on 1 process(es), this resume on 2" in capsys.readouterr().err
