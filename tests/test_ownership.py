"""Every output has one owner (isbi_unet/outputs.py): nothing a script did not make is written over or mixed."""

import json
import os
import subprocess

import pytest

from conftest import assert_fails, run, snapshot, write_dataset
from isbi_unet.errors import DataError
from isbi_unet.figures import plot_losses, read_log
from isbi_unet.outputs import Output, check_finished, claim, claim_file, written_kind

LOG = "epoch,train_loss\n1,0.5\n2,0.4\n"


def own_run(folder, names, finished=True):
    """A folder as a script leaves it: its files and its record listing them."""
    folder.mkdir(exist_ok=True)
    out = Output(str(folder), "--out", "run.json", overwrite=False)
    out.start(writes=names)
    for name in names:
        (folder / name).write_bytes(b"x")
    if finished:
        out.finish()


def claim_folder(folder, flag, record, overwrite=False):
    with claim(folder, flag, record, overwrite):
        pass


@pytest.mark.parametrize("state", ["absent", "empty", "own"])
def test_a_new_empty_or_own_folder_is_claimed(tmp_path, state):
    folder = tmp_path / "out"
    if state != "absent":
        folder.mkdir()
    if state == "own":
        own_run(folder, ["0.png", "1.png"])
    claim_folder(str(folder), "--out", "run.json")


@pytest.mark.parametrize("extra", ["mine.png", ".hidden", "notes"])
def test_a_folder_with_anything_else_is_refused_naming_it(tmp_path, extra):
    folder = tmp_path / "out"
    folder.mkdir()
    own_run(folder, ["0.png"])
    (folder / extra).mkdir() if extra == "notes" else (folder / extra).write_text("theirs")
    with pytest.raises(DataError, match=f"--out holds files this script did not write \\({extra}\\)"):
        claim_folder(str(folder), "--out", "run.json")
    claim_folder(str(folder), "--out", "run.json", overwrite=True)


def test_a_foreign_record_of_the_same_name_is_not_ours(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "run.json").write_text('{"my": "own file"}')
    with pytest.raises(DataError, match=r"run\.json"):
        claim_folder(str(folder), "--out", "run.json")


def test_the_earlier_output_goes_as_a_whole_and_the_users_files_stay(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    own_run(folder, ["0.png", "1.png", "2.png"])
    (folder / "mine.txt").write_text("theirs")  # allowed in with --overwrite
    with claim(str(folder), "--out", "run.json", overwrite=True) as out:
        out.start(writes=["0.png"])
        assert sorted(os.listdir(folder)) == ["mine.txt", "run.json"]
        assert json.loads((folder / "run.json").read_text())["finished"] is False


def test_a_run_cut_short_is_replaced_by_a_rerun_and_refused_by_readers(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    own_run(folder, ["0.png", "1.png"], finished=False)
    with pytest.raises(DataError, match="unfinished"):
        check_finished(str(folder), "run.json", "--res_path")
    with claim(str(folder), "--out", "run.json") as out:  # not blocked by its own leftovers
        out.start(writes=["0.png", "1.png"])
        for name in ("0.png", "1.png"):
            (folder / name).write_bytes(b"y")
    check_finished(str(folder), "run.json", "--res_path")


def test_a_file_output_replaces_only_its_own_kind(tmp_path):
    plot = tmp_path / "loss.png"
    (tmp_path / "log.csv").write_text(LOG)
    plot_losses(read_log(str(tmp_path / "log.csv")), str(plot))
    assert written_kind(str(plot)) == "loss plot"
    claim_file(str(plot), "--out", "loss plot")
    with pytest.raises(DataError, match="--figure exists and is not a figure"):
        claim_file(str(plot), "--figure", "figure")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="--out exists"):
        claim_file(str(photo), "--out", "loss plot")
    claim_file(str(photo), "--out", "loss plot", overwrite=True)


def test_plot_keeps_a_users_png_and_redraws_its_own(tmp_path):
    (tmp_path / "log.csv").write_text(LOG)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    assert_fails(run("plot.py", "--log", tmp_path / "log.csv", "--out", mine, check=False), mine, "--overwrite")
    assert mine.read_bytes() == b"a user's picture"
    run("plot.py", "--log", tmp_path / "log.csv")  # loss.png beside the log: new
    run("plot.py", "--log", tmp_path / "log.csv")  # and again: its own
    run("plot.py", "--log", tmp_path / "log.csv", "--out", mine, "--overwrite")
    assert written_kind(str(mine)) == "loss plot"


def test_visualize_never_mixes_overlays_or_writes_over_a_users_folder(tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=1, n_test=4)
    res = tmp_path / "res"
    res.mkdir()
    for i in range(4):  # masks and probabilities as predict_unet_test.py writes them
        image = f"{data}/test/{i}.png"
        (res / "prob").mkdir(exist_ok=True)
        for target in (res / f"{i}.png", res / "prob" / f"{i}.png"):
            target.write_bytes(open(image, "rb").read())
    flags = ["--res_path", res, "--image_path", f"{data}/test"]
    run("visualize.py", *flags, "--n", 4)
    run("visualize.py", *flags, "--n", 2)
    assert sorted(os.listdir(res / "overlay")) == ["0.png", "1.png", "overlay.json"]  # not 2 new beside 2 old
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.png").write_bytes(b"x")
    before = snapshot(theirs)
    proc = run("visualize.py", *flags, "--overlay_dir", theirs, check=False)
    assert_fails(proc, theirs, "--overlay_dir", "keep.png")
    assert snapshot(theirs) == before
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"a user's figure")
    assert_fails(run("visualize.py", *flags, "--figure", figure, check=False), figure, "--figure")
    assert figure.read_bytes() == b"a user's figure"


def test_evaluate_refuses_the_maps_of_a_prediction_that_was_stopped(tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=2, n_test=0)
    res = tmp_path / "res"
    (res / "prob").mkdir(parents=True)
    out = Output(str(res), "--save_res_path", "run.json", overwrite=False)
    out.start(writes=["prob/0.png", "prob/1.png"])
    for name in ("0.png", "1.png"):
        (res / "prob" / name).write_bytes(open(f"{data}/train/label/{name}", "rb").read())
    proc = run("evaluate.py", "--prob_dir", res / "prob", "--label_dir", f"{data}/train/label", check=False)  # stopped
    assert_fails(proc, res, "unfinished")
    out.finish()
    assert "v_rand" in run("evaluate.py", "--prob_dir", res / "prob", "--label_dir", f"{data}/train/label").stdout


def test_predictions_replace_their_own_earlier_results_as_a_whole_and_keep_a_users(data, trained, tmp_path):
    from conftest import predict_script

    res = tmp_path / "res"
    predict_script(trained / "best", f"{data}/test", res)  # 3 slices
    run("visualize.py", "--res_path", res, "--n", 2)
    two = tmp_path / "two"
    os.makedirs(two)
    for name in ("0.png", "1.png"):
        os.link(f"{data}/test/{name}", two / name)
    predict_script(trained / "best", two, res)  # 2 slices from another folder: no third mask, no stale overlay
    assert sorted(os.listdir(res)) == ["0.png", "1.png", "prob", "run.json", "submission.tif"]
    assert sorted(os.listdir(res / "prob")) == ["0.png", "1.png"]
    record = json.loads((res / "run.json").read_text())
    assert record["finished"] is True and "2.png" not in record["outputs"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "0.png").write_bytes(b"a user's own")
    (mine / "run.json").write_text("{}")
    before = snapshot(mine)
    assert_fails(predict_script(trained / "best", two, mine, check=False), mine, "--save_res_path", "--overwrite")
    assert snapshot(mine) == before


def test_more_workers_than_cores_are_capped_with_a_note(data, trained, tmp_path):
    from conftest import predict_script

    cores = len(os.sched_getaffinity(0))
    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", "--workers", cores + 3)
    assert f"warning: --workers {cores + 3} is more than the {cores} CPU cores here; using {cores}" in proc.stderr
    assert f"x {cores} process(es)" in proc.stdout


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_no_workers_is_refused(data, trained, tmp_path, workers):
    from conftest import predict_script

    proc = predict_script(trained / "best", f"{data}/test", tmp_path / "res", "--workers", workers, check=False)
    assert_fails(proc, "--workers")
    assert not (tmp_path / "res").exists()


def test_a_png_that_cannot_be_written_is_a_write_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    import numpy as np

    from isbi_unet.errors import WriteError
    from isbi_unet.images import write_png

    path = tmp_path / "0.png"
    write_png(str(path), np.zeros((8, 8), np.uint8))
    before = path.read_bytes()
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp.png"):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(WriteError, match=r"0\.png: cannot write \(No space left on device\)"):
        write_png(str(path), np.full((8, 8), 255, np.uint8))
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["0.png"]


@pytest.mark.parametrize(
    "counts", [["--nproc_per_node", "0"], ["--nnodes", "0"], ["--nnodes", "2", "--node_rank", "2"]]
)
def test_the_launcher_refuses_counts_that_start_nothing(counts):
    proc = run("-m", "isbi_unet.launch", *counts, "TrainUnetDataSet.py", "--epochs", "1", check=False)
    assert_fails(proc, counts[-2])


@pytest.mark.parametrize("nproc", ["0", "two", "-1"])
def test_train_sh_refuses_a_process_count_that_is_not_one_or_more(tmp_path, nproc):
    from conftest import user_checkout

    root = user_checkout(tmp_path / "repo")
    env = {**os.environ, "NPROC": nproc}
    proc = subprocess.run(["bash", "train.sh", "--epochs", "1"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: NPROC must be a whole number of processes, 1 or more, got '{nproc}'"
    )
    assert not (root / "checkpoints" / "config.json").exists()


def test_training_writes_only_into_a_folder_of_runs(tmp_path, data):
    from isbi_unet.run_dir import checkpoint_dir_for

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "README.md").write_text("the repo's note")  # as checkpoints/ ships
    (folder / ".best.tmp").mkdir()  # left by a run killed while saving
    assert checkpoint_dir_for(str(folder), None, data, overwrite=False) == (str(folder), False)
    (folder / "notes.txt").write_text("theirs")
    with pytest.raises(DataError, match=r"--checkpoint_dir holds files a run does not write \(notes\.txt\)"):
        checkpoint_dir_for(str(folder), None, data, overwrite=False)
    assert checkpoint_dir_for(str(folder), None, data, overwrite=True)[0] == str(folder)


def test_benchmark_never_writes_over_an_existing_json(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"mine": 1}')
    proc = run("benchmark.py", "--modes", "eager", "--json", results, check=False)
    assert_fails(proc, results, "--json", "--overwrite")
    assert results.read_text() == '{"mine": 1}'


def write_store(folder, chunks):
    """A folder output as an OME-Zarr writer leaves it: files in sub-folders of one named folder."""
    for rel, data in chunks.items():
        path = folder / "prob.ome.zarr" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_a_folder_output_is_recorded_file_by_file_and_replaced_only_as_written(tmp_path):
    folder = tmp_path / "out"
    with claim(str(folder), "--out", "run.json") as out:
        out.start(writes=["prob.ome.zarr"])
        write_store(folder, {".zattrs": b"{}", "0/0.0": b"a", "0/0.1": b"b"})
    files = json.loads((folder / "run.json").read_text())["files"]
    assert sorted(files) == ["prob.ome.zarr/.zattrs", "prob.ome.zarr/0/0.0", "prob.ome.zarr/0/0.1"]
    claim_folder(str(folder), "--out", "run.json")  # all its own: a rerun may replace it
    (folder / "prob.ome.zarr" / "0" / "0.1").write_bytes(b"corrected by hand")
    with pytest.raises(DataError, match=r"prob\.ome\.zarr/0/0\.1 \(changed since written\)"):
        claim_folder(str(folder), "--out", "run.json")


def test_a_stopped_folder_output_is_replaced_or_continued_as_the_script_decides(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), claim(str(folder), "--out", "run.json") as out:
        out.start(writes=["prob.ome.zarr", "journal"], fingerprint="A")
        write_store(folder, {"0/0.0": b"a"})
        (folder / "journal").write_text("0\n")
        raise KeyboardInterrupt  # stopped mid-run: the record stays unfinished
    with claim(str(folder), "--out", "run.json") as out:
        assert out.earlier_record()["fingerprint"] == "A" and out.earlier_record()["finished"] is False
        out.start(writes=["prob.ome.zarr", "journal"], keep_stopped=True, fingerprint="A")
        assert (folder / "prob.ome.zarr" / "0" / "0.0").read_bytes() == b"a"  # continued, not removed
        assert (folder / "journal").read_text() == "0\n"
    assert json.loads((folder / "run.json").read_text())["finished"] is True
    with claim(str(folder), "--out", "run.json") as out:  # another run: the stopped one's files go as a whole
        out.start(writes=["other"])
        assert sorted(os.listdir(folder)) == ["run.json"]
