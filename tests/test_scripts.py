"""The real scripts end to end: train -> checkpoint -> predict -> plot, and resume."""

import csv
import json
import os

import cv2
import numpy as np
import pytest

from conftest import assert_fails, predict_script, run, train_script
from isbi_unet.errors import DataError


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_held_out_block_is_contiguous_and_movable(data):
    from isbi_unet.images import split_names

    names = [f"{i}.png" for i in range(6)]
    assert split_names(f"{data}/train", 2) == (names[:4], names[4:])  # the last block by default
    assert split_names(f"{data}/train", 2, 0) == (names[2:], names[:2])
    assert split_names(f"{data}/train", 2, 3) == (names[:3] + names[5:], names[3:5])
    with pytest.raises(DataError, match="--val_start must be -1"):  # torch_reference.py has no resolve_args
        split_names(f"{data}/train", 2, -2)


def test_train_predict_plot_round_trip(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = train_script(f"{data}/train", ckpt, "--samples_per_slice", 3, epochs=2).stdout
    assert "recipe cpu (--recipe" not in out and "recipe cpu (no CUDA device)" in out
    assert "4 training slices x 3 sample(s) per epoch, 2 validation slices" in out
    for name in ("best", "last"):
        assert os.path.isfile(ckpt / name / "pickled_data")
    rows = read_log(ckpt / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r["train_loss"])) and np.isfinite(float(r["val_loss"])) for r in rows)
    config = json.loads((ckpt / "config.json").read_text())
    assert (
        config["width"] == 4
        and config["crop_size"] == 32
        and config["samples_per_slice"] == 3
        and config["world_size"] == 1
    )
    assert (ckpt / "loss.png").is_file()

    res = tmp_path / "res"
    out = predict_script(ckpt / "best", f"{data}/test", res).stdout
    assert "3 masks" in out
    for i in range(3):
        mask = cv2.imread(str(res / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        prob = cv2.imread(str(res / "prob" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == prob.shape == (48, 48) and mask.dtype == prob.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        # the mask is the probability map thresholded at 0.5
        np.testing.assert_array_equal(mask == 255, prob >= 128)

    png = tmp_path / "curve.png"
    assert run("plot.py", "--log", ckpt / "log.csv", "--out", png).stdout.strip() == str(png)
    assert cv2.imread(str(png)) is not None


def test_resume_continues_from_saved_epoch(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt)
    out = train_script(f"{data}/train", ckpt, "--resume", ckpt / "last", epochs=3).stdout
    assert "epoch   1/3" not in out and "epoch   2/3" in out and "epoch   3/3" in out
    assert [r["epoch"] for r in read_log(ckpt / "log.csv")] == ["1", "2", "3"]


def test_lr_reaches_the_optimizer(data, tmp_path):
    # The article's lr never reached Adam; here a zero-effect lr must leave the weights untouched.
    import oneflow as flow

    from isbi_unet.checkpoint import load_checkpoint

    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt, "--lr", 1e-12, "--schedule", "constant")
    state = load_checkpoint(str(ckpt / "last"))
    assert state["optimizer"]["param_groups"][0]["_options"]["lr"] == 1e-12
    flow.manual_seed(0)
    from unet import UNet

    fresh = UNet(**state["model_config"]).state_dict()
    w = state["model"]["inc.double_conv.0.weight"].numpy()
    np.testing.assert_allclose(w, fresh["inc.double_conv.0.weight"].numpy(), atol=1e-8)


def test_bilinear_model_trains_and_predicts(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt, "--bilinear")
    predict_script(ckpt / "best", f"{data}/test", tmp_path / "res")
    assert len(os.listdir(tmp_path / "res" / "prob")) == 3


def test_cosine_schedule_reaches_the_optimizer(data, tmp_path):
    from isbi_unet.checkpoint import load_checkpoint

    ckpt = tmp_path / "ckpt"
    # 4 training slices, batch 2: 2 steps per epoch, 4 in all; after epoch 1 the cosine is at its middle.
    train_script(f"{data}/train", ckpt, "--lr", 0.01, "--schedule", "cosine", epochs=2)
    with open(ckpt / "log.csv") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert lrs == pytest.approx([0.005, 0.0])
    state = load_checkpoint(str(ckpt / "last"))
    assert state["optimizer"]["param_groups"][0]["_options"]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_graph_and_eager_training_agree(data, tmp_path):
    from isbi_unet.checkpoint import load_checkpoint

    # 4 training slices in batches of 2: no short batch for the graph to drop, so both see the same data.
    for mode in ("eager", "graph"):
        train_script(f"{data}/train", tmp_path / mode, *(["--graph"] if mode == "graph" else []), epochs=2)
    eager, graph = (load_checkpoint(str(tmp_path / m / "last")) for m in ("eager", "graph"))
    assert "graph" in graph and "optimizer" in eager
    for key, value in eager["model"].items():
        if key.endswith("num_batches_tracked"):  # counted by eager BatchNorm only; unused with a fixed momentum
            continue
        # Graph mode sums in another order; Adam turns a ~1e-7 gradient difference on a near-zero gradient into
        # a step up to lr (1e-3) apart, so single weights may differ by ~1e-5 while the mean stays far below.
        np.testing.assert_allclose(graph["model"][key].numpy(), value.numpy(), rtol=1e-3, atol=1e-4, err_msg=key)
        assert np.abs(graph["model"][key].numpy() - value.numpy()).mean() < 1e-6, key
    moved = np.abs(
        eager["model"]["inc.double_conv.0.weight"].numpy() - graph["model"]["inc.double_conv.0.weight"].numpy()
    ).max()
    rows = {m: read_log(tmp_path / m / "log.csv") for m in ("eager", "graph")}
    for a, b in zip(rows["eager"], rows["graph"]):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-4)
    print("max weight difference graph vs eager:", moved)


def test_graph_checkpoint_resumes_in_graph_mode(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt, "--graph")
    out = train_script(f"{data}/train", ckpt, "--graph", "--resume", ckpt / "last", epochs=2).stdout
    assert "Adam's moments restart" not in out and "epoch   2/2" in out
    assert [r["epoch"] for r in read_log(ckpt / "log.csv")] == ["1", "2"]
    # and it predicts like any checkpoint, also through a graph
    res = tmp_path / "res"
    out = predict_script(ckpt / "best", f"{data}/test", res, "--graph").stdout
    assert "3 masks" in out and "graph" in out


def test_prediction_options_and_submission_stack(data, trained, tmp_path):
    ckpt = trained
    probs = {}
    for name, extra in {"whole": [], "tiles": ["--tile", "32", "--overlap", "16"], "tta": ["--tta"]}.items():
        res = tmp_path / name
        out = predict_script(
            ckpt / "best", f"{data}/train/image", res, "--label_path", f"{data}/train/label", *extra
        ).stdout
        assert out.splitlines()[-1].startswith("mean")  # the score table, one row per slice and the stack
        assert len(out.splitlines()) == 1 + 1 + 6 + 1
        ok, pages = cv2.imreadmulti(str(res / "submission.tif"), flags=cv2.IMREAD_UNCHANGED)
        assert ok and len(pages) == 6 and pages[0].dtype == np.float32 and pages[0].shape == (48, 48)
        png = cv2.imread(str(res / "prob" / "0.png"), cv2.IMREAD_UNCHANGED)
        assert np.abs(np.round(pages[0] * 255) - png).max() <= 1  # the stack holds the same cell probabilities
        probs[name] = pages[0]
    # TTA, same model: close but not identical maps; blocks (--tile) give the whole-image pass's maps exactly
    assert 0 < np.abs(probs["tta"] - probs["whole"]).mean() < 0.2
    np.testing.assert_array_equal(probs["tiles"], probs["whole"])


def test_prediction_workers_write_the_same_results_as_one_process(data, trained, tmp_path):
    ckpt = trained
    for workers in (1, 2):
        out = predict_script(ckpt / "best", f"{data}/test", tmp_path / f"w{workers}", "--workers", workers).stdout
        assert f"x {workers} process(es)" in out
    assert (tmp_path / "w1" / "submission.tif").read_bytes() == (tmp_path / "w2" / "submission.tif").read_bytes()
    for i in range(3):
        assert (tmp_path / "w1" / f"{i}.png").read_bytes() == (tmp_path / "w2" / f"{i}.png").read_bytes()


def test_one_process_loads_each_checkpoint_once(data, trained, tmp_path, monkeypatch):
    import predict_unet_test
    from isbi_unet import checkpoint

    loads = []
    load_model = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device: loads.append(path) or load_model(path, device))
    args = ["--Test_Data_path", f"{data}/test", "--save_res_path", tmp_path / "res", "--workers", 1]
    args += ["--engine", "oneflow"]  # loaded here (the default converts each in a child, which loads it there)
    predict_unet_test.main([str(a) for a in ["--checkpoint", trained / "best", trained / "last", *args]])
    assert loads == [str(trained / "best"), str(trained / "last")]
    assert len(list((tmp_path / "res" / "prob").glob("*.png"))) == 3


def test_several_checkpoints_average_their_probabilities(data, tmp_path):
    ckpts = [tmp_path / f"seed{s}" for s in (0, 1)]
    for seed, ckpt in zip((0, 1), ckpts):
        train_script(f"{data}/train", ckpt, "--seed", seed)
    pages = {}
    for name, chosen in {"a": ckpts[:1], "b": ckpts[1:], "ab": ckpts}.items():
        out = run(
            "predict_unet_test.py",
            "--checkpoint",
            *[c / "last" for c in chosen],
            "--Test_Data_path",
            f"{data}/test",
            "--save_res_path",
            tmp_path / name,
            "--workers",
            1,
        ).stdout
        ok, pages[name] = cv2.imreadmulti(str(tmp_path / name / "submission.tif"), flags=cv2.IMREAD_UNCHANGED)
        assert ok and len(pages[name]) == 3
    assert "mean of 2 checkpoints, epochs 1, 1" in out
    for a, b, ab in zip(pages["a"], pages["b"], pages["ab"]):
        assert np.abs(a - b).mean() > 1e-3  # two seeds, two different models
        np.testing.assert_allclose(ab, (a + b) / 2, atol=1e-5)
    record = json.loads((tmp_path / "ab" / "run.json").read_text())
    assert record["args"]["checkpoint"] == [str(c / "last") for c in ckpts] and record["checkpoint_epoch"] == [1, 1]
    assert [c["width"] for c in record["model_config"]] == [4, 4]

    proc = run(
        "predict_unet_test.py",
        "--checkpoint",
        ckpts[0] / "last",
        tmp_path / "none",
        "--Test_Data_path",
        f"{data}/test",
        "--save_res_path",
        tmp_path / "bad",
        check=False,
    )
    assert_fails(proc, tmp_path / "none")
    assert not (tmp_path / "bad").exists()  # a bad checkpoint anywhere in the list: nothing written
