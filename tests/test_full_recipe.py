"""The `full` recipe (whole slices, its batch over any number of processes, --graph), the one a CUDA machine runs
by default, rehearsed on CPU at a tiny width on square and non-square slices."""

import csv
import json

import numpy as np
import pytest

from conftest import free_port, run, write_dataset
from isbi_unet.dataset import Slices
from isbi_unet.images import dihedral

FULL = ["--recipe", "full", "--width", "4", "--epochs", "1", "--val_slices", "2", "--bn_slices", "2", "--device", "cpu"]
SIZES = {"square": (48, 48), "non-square": (48, 80)}


def full_run(tmp_path, size, *flags, launcher=()):
    data = write_dataset(str(tmp_path / "data"), n_train=6, n_test=0, size=size)
    ckpt = tmp_path / "ckpt"
    proc = run(
        *launcher, "TrainUnetDataSet.py", "--data_path", f"{data}/train", "--checkpoint_dir", ckpt, *FULL, *flags
    )
    with open(ckpt / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, json.loads((ckpt / "config.json").read_text()), rows


@pytest.mark.parametrize("shape", SIZES)
def test_the_full_recipe_trains_on_whole_slices(tmp_path, shape):
    proc, config, rows = full_run(tmp_path, SIZES[shape])
    assert config["recipe"] == "full" and config["crop_size"] == 0 and config["batch_size"] == 2
    assert "crop none, batch 2 x 1 process(es)" in proc.stdout
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))


def test_the_full_recipe_through_nn_graph_on_non_square_slices(tmp_path):
    proc, config, rows = full_run(tmp_path, SIZES["non-square"], "--graph")
    assert config["graph"] is True and "graph on cpu" in proc.stdout
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))


@pytest.mark.parametrize("nproc", [2, 3])
def test_the_full_recipe_splits_its_batch_over_the_processes(tmp_path, nproc):
    launcher = ["-m", "isbi_unet.launch", "--nproc_per_node", nproc, "--master_port", free_port()]
    proc, config, rows = full_run(tmp_path, SIZES["non-square"], launcher=launcher)
    assert config["batch_size"] == 1 and config["world_size"] == nproc  # the recipe's 2 shared, at least 1 each
    assert f"batch 1 x {nproc} process(es)" in proc.stdout
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))


def slices(root, size, augment=True):
    data = write_dataset(str(root / f"{size[0]}x{size[1]}"), n_train=8, n_test=0, size=size)
    return Slices(f"{data}/train/image", f"{data}/train/label", augment=augment, elastic_sigma=0.0, seed=3)


def test_non_square_samples_keep_their_shape_and_square_ones_their_eight_symmetries(tmp_path):
    flat = slices(tmp_path, (48, 80))
    assert {flat[i][k].shape for i in range(len(flat)) for k in (0, 1)} == {(1, 48, 80)}
    # A square sample draws as it always did (the pinned CPU run trains on square crops): the 3 jitter draws,
    # then k among all 8, quarter turns included.
    square, plain = slices(tmp_path, (48, 48)), slices(tmp_path, (48, 48), augment=False)
    ks = []
    for i in range(len(square)):
        rng = np.random.default_rng((3, 0, i))
        rng.uniform(size=3)
        ks.append(int(rng.integers(8)))
        np.testing.assert_array_equal(square[i][1], dihedral(plain[i][1], ks[-1]))
    assert any(k % 2 for k in ks)
