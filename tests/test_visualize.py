"""visualize.py on synthetic slices and hand-made prediction files."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import assert_fails, run, train_script, write_dataset


@pytest.fixture
def predicted(tmp_path):
    """A data folder and a results folder as predict_unet_test.py leaves it; the 'prediction' is the label."""
    data = write_dataset(str(tmp_path / "data"), n_train=5, n_test=0)
    res = tmp_path / "res"
    os.makedirs(res / "prob")
    for i in range(5):
        label = cv2.imread(f"{data}/train/label/{i}.png", cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(res / f"{i}.png"), label)
        cv2.imwrite(str(res / "prob" / f"{i}.png"), np.where(label == 255, 230, 20).astype(np.uint8))
    (res / "run.json").write_text(json.dumps({"args": {"Test_Data_path": f"{data}/train/image"}}))
    return data, res


def test_overlays_and_figure_without_labels(predicted):
    data, res = predicted
    out = run("visualize.py", "--res_path", res).stdout  # the images' folder comes from run.json
    assert f"3 overlays in {res / 'overlay'}/" in out
    assert sorted(os.listdir(res / "overlay")) == ["0.png", "1.png", "2.png", "overlay.json"]  # --n 3, natural order
    image = cv2.imread(f"{data}/train/image/1.png", cv2.IMREAD_GRAYSCALE).astype(int)
    over = cv2.imread(str(res / "overlay" / "1.png")).astype(int)
    mask = cv2.imread(str(res / "1.png"), cv2.IMREAD_GRAYSCALE)
    cell, membrane = mask == 255, mask == 0
    assert membrane.any() and cell.any()
    for channel in range(3):  # cells keep the slice's grey
        np.testing.assert_array_equal(over[..., channel][cell], image[cell])
    b, g, r = over[..., 0][membrane], over[..., 1][membrane], over[..., 2][membrane]
    assert (b > g).all() and (r > g).all()  # membrane tinted magenta
    figure = cv2.imread(str(res / "figure.png"))
    assert figure.shape[1] == 1200 and figure.shape[0] > 800  # 4 columns, 3 rows


def labelled(data):
    """The flags that show the training slices with their labels."""
    return ["--image_path", f"{data}/train/image", "--label_path", f"{data}/train/label"]


def test_figure_with_labels_and_shrunk_overlays(predicted, tmp_path):
    data, res = predicted
    out = ["--figure", tmp_path / "fig.png", "--overlay_dir", tmp_path / "ov", "--max_side", 24]
    run("visualize.py", "--res_path", res, *labelled(data), "--n", 2, *out)
    assert cv2.imread(str(tmp_path / "fig.png")).shape[:2] == (620, 1200)
    assert sorted(os.listdir(tmp_path / "ov")) == ["0.png", "1.png", "overlay.json"]
    assert cv2.imread(str(tmp_path / "ov" / "0.png")).shape == (24, 24, 3)


def test_missing_prediction_is_one_line_and_writes_nothing(predicted):
    data, res = predicted
    os.remove(res / "prob" / "2.png")
    assert_fails(run("visualize.py", "--res_path", res, check=False), res / "prob" / "2.png", "no such file")
    assert not (res / "overlay").exists() and not (res / "figure.png").exists()


def test_bad_flags_and_unknown_images(predicted, tmp_path):
    data, res = predicted
    assert_fails(
        run("visualize.py", "--res_path", res, "--n", 0, check=False), "argument --n: must be an integer in 1.."
    )
    os.remove(res / "run.json")
    assert_fails(run("visualize.py", "--res_path", res, check=False), res / "run.json", "--image_path")
    cv2.imwrite(f"{data}/train/label/0.png", np.full((48, 48), 128, np.uint8))
    proc = run("visualize.py", "--res_path", res, *labelled(data), check=False)
    assert_fails(proc, f"{data}/train/label/0.png", "not a binary label")


def test_make_docs_draws_the_readme_pictures_from_a_run(data, tmp_path):
    from conftest import REPO

    ckpt = tmp_path / "ckpt"
    train_script(f"{data}/train", ckpt, epochs=2)
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", "tools/make_docs.sh", str(ckpt), str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 masks" in proc.stdout  # the two held-out slices (--val_slices 2), 4.png and 5.png
    assert cv2.imread(str(tmp_path / "out" / "figure.png")).shape[:2] == (372, 720)  # 2 rows at dpi 60
    assert cv2.imread(str(tmp_path / "out" / "overlay.png")).shape == (48, 48, 3)  # already under --max_side
    assert cv2.imread(str(tmp_path / "out" / "loss.png")) is not None


@pytest.mark.parametrize(
    "args,res",
    [([], "results"), (["--save_res_path", "r2", "--checkpoint", "c"], "r2"), (["--save-res-path=r3"], "r3")],
)
def test_test_sh_hands_the_results_folder_to_visualize(tmp_path, args, res):
    # test.sh itself, with stand-ins for setup and the Python scripts that record their arguments.
    from conftest import REPO

    shutil.copy(os.path.join(REPO, "test.sh"), tmp_path)
    (tmp_path / "setup.sh").write_text("")
    for script in ("get_data.py", "predict_unet_test.py", "visualize.py"):
        (tmp_path / script).write_text(
            f"import sys\nopen('calls', 'a').write(' '.join(['{script}', *sys.argv[1:]]) + '\\n')\n"
        )
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    subprocess.run(["bash", "test.sh", *args], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "calls").read_text().splitlines() == [
        "get_data.py",
        " ".join(["predict_unet_test.py", *args]),
        f"visualize.py --res_path {res}",
    ]


@pytest.mark.parametrize("palette", [[], ["--palette"]])
def test_a_figure_that_cannot_be_written_is_one_line_naming_it(predicted, palette):
    data, res = predicted
    (res / "figure.png").mkdir()  # with --overwrite it passes every check, then the write itself fails
    proc = run("visualize.py", "--res_path", res, "--overwrite", *palette, check=False)
    assert_fails(proc, res / "figure.png", "cannot write the figure")
