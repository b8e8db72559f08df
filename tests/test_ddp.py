"""Data-parallel training through the real launcher, two CPU processes: isbi_unet.launch (what train.sh runs),
and the article's command, OneFlow's launcher as written."""

import os

import numpy as np
import oneflow as flow

from conftest import TINY, free_port, run
from unet import UNet


def launch(*args, launcher="isbi_unet.launch", check=True):
    return run("-m", launcher, "--nproc_per_node", 2, "--master_port", free_port(), *args, check=check)


def test_two_processes_end_with_identical_weights(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    launch(
        "tests/ddp_worker.py", tmp_path, "--data_path", f"{data}/train", "--epochs", 2, "--checkpoint_dir", ckpt, *TINY
    )
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert sorted(r0.files) == sorted(r1.files) and len(r0.files) > 50
    for key in r0.files:
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
    # and training moved them away from the (seeded) initialisation
    flow.manual_seed(0)
    init = UNet(n_channels=1, n_classes=1, width=4).state_dict()["inc.double_conv.0.weight"].numpy()
    assert np.abs(r0["inc.double_conv.0.weight"] - init).max() > 1e-4


def test_the_articles_command_trains_and_only_rank0_writes(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = ["--data_path", f"{data}/train", "--epochs", 2, "--checkpoint_dir", ckpt, *TINY]
    out = launch("TrainUnetDataSet.py", *flags, launcher="oneflow.distributed.launch").stdout
    assert "batch 2 x 2 process(es)" in out
    assert out.count("epoch   2/2") == 1  # rank 1 prints nothing
    assert os.path.isfile(ckpt / "best" / "pickled_data")
    assert len((ckpt / "log.csv").read_text().splitlines()) == 3


def test_recipe_batch_is_split_over_processes():
    from TrainUnetDataSet import RECIPES, parse_args, resolve_args

    total = RECIPES["cpu"]["batch_size"]
    assert resolve_args(parse_args([]), cuda=False, world_size=1).batch_size == total
    assert resolve_args(parse_args([]), cuda=False, world_size=2).batch_size == total // 2
    assert (
        resolve_args(parse_args(["--batch_size", "3"]), cuda=False, world_size=2).batch_size == 3
    )  # explicit: per process


def test_graph_under_the_launcher_says_why_not(data, tmp_path):
    flags = ["--data_path", f"{data}/train", "--epochs", 1, "--checkpoint_dir", tmp_path / "ckpt", "--graph", *TINY]
    proc = launch("TrainUnetDataSet.py", *flags, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "error: --graph runs on one process" in proc.stderr
    assert not (tmp_path / "ckpt").exists()
