"""Blockwise prediction end to end (isbi_unet/volume.py through predict_unet_test.py): the same answer however it is
cut, on real ISBI slices and synthetic stacks; a stopped, killed or full-disk run continues to the identical result;
a dead worker's blocks are redone; SIGTERM and a killed parent leave no worker behind; bad stacks are one line."""

import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from test_dead_rank import alive, children, wait_until

from conftest import REPO, assert_fails, predict_script, run, write_dataset
from isbi_unet.volume import JOURNAL, ArraySink, Journal, LocalExecutor, open_source, plan_volume, run_blocks

ISBI = "/work/shared/data/isbi2012/test"  # the real slices (tests/README: get_data.py puts them in data/)
OUTPUTS = ("prob.tif", "mask.tif", "submission.tif")


def write_stack(path, pages):
    import tifffile

    with tifffile.TiffWriter(path) as tiff:
        for page in pages:
            tiff.write(page, photometric="minisblack", contiguous=False)
    return str(path)


@pytest.fixture
def stack(tmp_path):
    """40 synthetic membrane pages of 96x80 (not a multiple of 16 across) in one TIFF."""
    images = write_dataset(str(tmp_path / "slices"), n_train=0, n_test=40, size=(96, 80)) + "/test"
    pages = [cv2.imread(f"{images}/{i}.png", cv2.IMREAD_UNCHANGED) for i in range(40)]
    return write_stack(tmp_path / "volume.tif", pages)


def results(folder):
    """The bytes of every result file (not the record, which names the run)."""
    names = sorted(n for n in os.listdir(folder) if n != "run.json" and not os.path.isdir(folder / n))
    names += ["prob/" + n for n in sorted(os.listdir(folder / "prob"))]
    return {n: (folder / n).read_bytes() for n in names}


@pytest.fixture
def reference(trained_run, stack, tmp_path):
    """The uninterrupted default run on `stack` (one block per page): what every other run must give."""
    res = tmp_path / "reference"
    predict_script(trained_run / "best", stack, res, "--workers", 1)
    return results(res)


@pytest.fixture
def tta_reference(trained_run, stack, tmp_path):
    """The same with --tta (8 passes per block: slow enough to stop mid-run)."""
    res = tmp_path / "tta_reference"
    predict_script(trained_run / "best", stack, res, "--tta", "--workers", 1)
    return results(res)


def start(trained_run, stack, res, *flags, **popen):
    cmd = [sys.executable, "predict_unet_test.py", "--checkpoint", str(trained_run / "best")]
    cmd += ["--Test_Data_path", str(stack), "--save_res_path", str(res), *map(str, flags)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished_blocks(res):
    try:
        with open(res / JOURNAL) as f:
            return max(0, f.read().count("\n") - 1)
    except OSError:
        return 0


def lines(stderr):
    return [line for line in stderr.splitlines() if "libibverbs" not in line]


def test_any_cut_and_any_worker_count_give_the_same_files(trained_run, stack, reference, tmp_path):
    for flags in (["--tile", 32, "--workers", 1], ["--tile", 48, "--workers", 2], ["--max_memory", 1.5]):
        res = tmp_path / "-".join(map(str, flags))
        out = predict_script(trained_run / "best", stack, res, *flags).stdout
        assert results(res) == reference, flags
        if "--tile" in flags:
            assert "blocks of" in out  # the pages were cut
    assert set(OUTPUTS) <= set(reference) and len([n for n in reference if n.startswith("prob/")]) == 40


def test_blocks_equal_the_whole_image_pass_of_the_predictor(trained_run, stack, tmp_path):
    from isbi_unet.images import read_slice
    from isbi_unet.predictor import AUTO, Predictor, Spec

    res = tmp_path / "res"
    predict_script(trained_run / "best", stack, res, "--tile", 16, "--workers", 1)
    ok, pages = cv2.imreadmulti(str(res / "submission.tif"), flags=cv2.IMREAD_UNCHANGED)
    predictor = Predictor.open(Spec((str(trained_run / "best"),), engine=AUTO))  # the command's engine
    for z in (0, 17, 39):
        np.testing.assert_array_equal(pages[z], predictor(read_slice(stack, str(z))))


def blockwise_probs(model, folder, side, tmp_path):
    """The engine's own code in this process: every slice of `folder` in blocks of `side`."""
    from isbi_unet.predictor import Spec

    source = open_source(str(folder))
    shapes = [source.shape(z) for z in range(len(source.names))]
    sink = ArraySink(shapes)
    journal = Journal(str(tmp_path / f"{side}.journal"), {"side": side})
    run_blocks(source, plan_volume(source, side), Spec((str(model),)), [sink], LocalExecutor(), journal, False)
    return [sink.probs[z] for z in range(len(shapes))]


@pytest.fixture(scope="module")
def models(trained_run, tmp_path_factory):
    """trained_run's checkpoint, its ONNX export and (with bioimageio.core) its package."""
    out = tmp_path_factory.mktemp("models")
    check = trained_run.parent / "data" / "test"
    kinds = {"OneFlow": trained_run / "best"}
    pytest.importorskip("onnxruntime")
    run("export_onnx.py", "--checkpoint", trained_run / "best", "--out", out / "unet.onnx", "--check_data", check)
    kinds["ONNX"] = out / "unet.onnx"
    try:
        import bioimageio.core  # noqa: F401
    except ImportError:
        return kinds
    # the package measures its halo on its check slice, which must be large enough to show one
    big = write_dataset(str(out / "big"), n_train=0, n_test=1, size=(256, 256)) + "/test"
    args = ["--checkpoint", trained_run / "best", "--bioimageio", out / "unet.zip", "--check_data", big]
    run("export_onnx.py", *args, "--author", "test", "--torch_python", "none")  # its ONNX weights are what runs here
    kinds["package"] = out / "unet.zip"
    return kinds


@pytest.mark.skipif(not os.path.isdir(ISBI), reason=f"the real ISBI slices are not at {ISBI}")
@pytest.mark.parametrize("kind", ["OneFlow", "ONNX", "package"])
def test_real_slices_at_several_tile_sizes_match_the_whole_image_pass(kind, models, tmp_path):
    from isbi_unet.images import read_gray
    from isbi_unet.predictor import Predictor, Spec

    if kind not in models:
        pytest.skip("bioimage.io packages need bioimageio.core (requirements-bioimageio.txt)")
    folder = tmp_path / "slices"
    folder.mkdir()
    # two real slices, one cropped to a size that is no multiple of 16 (the reflected border is then in play)
    cv2.imwrite(str(folder / "0.png"), read_gray(f"{ISBI}/0.png"))
    cv2.imwrite(str(folder / "1.png"), read_gray(f"{ISBI}/1.png")[3:400, 5:459])
    predictor = Predictor.open(Spec((str(models[kind]),)))
    wholes = [predictor(read_gray(str(folder / n))) for n in ("0.png", "1.png")]
    for side in (64, 128, 256):
        for whole, blocks in zip(wholes, blockwise_probs(models[kind], folder, side, tmp_path)):
            assert np.abs(blocks - whole).max() <= 1 / 255, (side, np.abs(blocks - whole).max())


def test_a_killed_run_continues_to_the_identical_result(trained_run, stack, tta_reference, tmp_path):
    res = tmp_path / "res"
    flags = ["--tile", 32, "--tta", "--workers", 1]
    proc = start(trained_run, stack, res, *flags)
    wait_until(lambda: finished_blocks(res) >= 20 or proc.poll() is not None, 300, "20 blocks finished")
    proc.kill()
    proc.communicate()
    done = finished_blocks(res)
    assert proc.returncode == -signal.SIGKILL and 20 <= done < 40 * 3 * 3  # stopped mid-run
    out = predict_script(trained_run / "best", stack, res, *flags).stdout
    assert f"continuing the stopped run in {res}: {done} blocks already finished" in out
    assert results(res) == tta_reference  # the journal is gone, every file as if never stopped


def test_a_stopped_run_with_other_settings_starts_over(trained_run, stack, reference, tmp_path):
    res = tmp_path / "res"
    proc = start(trained_run, stack, res, "--tile", 32, "--tta", "--workers", 1)
    wait_until(lambda: finished_blocks(res) >= 5 or proc.poll() is not None, 300, "5 blocks finished")
    proc.kill()
    proc.communicate()
    out = predict_script(trained_run / "best", stack, res, "--workers", 1).stdout  # no --tta: another answer
    assert f"the stopped run in {res} had another model, input or settings: starting over" in out
    assert results(res) == reference


@pytest.mark.slow
def test_a_dead_workers_blocks_are_redone(trained_run, stack, tta_reference, tmp_path):
    res = tmp_path / "res"
    proc = start(trained_run, stack, res, "--tile", 32, "--tta", "--workers", 2)
    wait_until(lambda: finished_blocks(res) >= 10 or proc.poll() is not None, 300, "10 blocks finished")
    workers = [pid for pid in children(proc.pid) if "spawn_main" in cmdline(pid)]
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert lines(err) == ["warning: a prediction worker died (killed, or out of memory); its blocks are redone"]
    assert results(res) == tta_reference


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def default_signals():
    for s in (signal.SIGINT, signal.SIGTERM):  # background shells start children with SIGINT ignored
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_the_parent_stops_every_worker(trained_run, stack, tmp_path, how):
    res = tmp_path / "res"
    proc = start(trained_run, stack, res, "--tile", 32, "--tta", "--workers", 2, preexec_fn=default_signals)
    wait_until(lambda: finished_blocks(res) >= 4 or proc.poll() is not None, 300, "4 blocks finished")
    workers = [pid for pid in children(proc.pid) if "spawn_main" in cmdline(pid)]
    assert len(workers) == 2
    os.kill(proc.pid, getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if how == "SIGTERM":
        assert proc.returncode == 143 and lines(err) == ["error: terminated (SIGTERM)"], err
    wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the workers to end with their parent")


def test_a_full_disk_mid_volume_is_one_line_and_the_run_continues(trained_run, stack, reference, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and a sandbox that allows mounts)")
    try:
        res = disk / "res"
        tiffs = sum(len(reference[n]) for n in OUTPUTS)
        pngs = sum(-(-len(data) // 4096) * 4096 for n, data in reference.items() if n.endswith(".png"))
        room = (tiffs + pngs // 2 + 64 * 1024) // 1024  # the TIFFs fit, about half the PNGs do not
        subprocess.run(["mount", "-o", f"remount,size={room}k", disk], check=True)
        proc = predict_script(trained_run / "best", stack, res, "--workers", 1, check=False)
        assert_fails(proc, "cannot write", "No space left on device")
        assert 0 < finished_blocks(res) < 40
        subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
        out = predict_script(trained_run / "best", stack, res, "--workers", 1).stdout
        assert "continuing the stopped run" in out and results(res) == reference
    finally:
        subprocess.run(["umount", disk], check=True)


@pytest.mark.parametrize(
    "damage,fragment",
    [("sizes", "page 2: 64x96 uint8 differs from page 0's 80x96 uint8"), ("truncated", "truncated")],
)
def test_bad_stacks_are_one_line_and_write_nothing(trained_run, stack, tmp_path, damage, fragment):
    import tifffile

    pages = [tifffile.imread(stack, key=z) for z in range(40)]
    if damage == "sizes":
        pages[2] = pages[2][:, :64]
        write_stack(stack, pages)
    else:
        with open(stack, "r+b") as f:
            f.truncate(os.path.getsize(stack) // 2)
    proc = predict_script(trained_run / "best", stack, tmp_path / "res", check=False)
    assert_fails(proc, stack, fragment)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--tile", 160000, "--max_memory", 2], "--tile 160000 needs about"),
        (["--max_memory", 0.05], "--max_memory 0.05 GB is too small"),
        (["--max_memory", -1], "--max_memory: must be a finite number in (0, 4096]"),
        (["--tile", 40], "tile must be a multiple of 16"),
    ],
)
def test_a_budget_that_cannot_work_is_one_line(trained_run, tmp_path, flags, fragment):
    big = write_stack(tmp_path / "big.tif", [np.zeros((4096, 4096), np.uint8)])
    proc = predict_script(trained_run / "best", big, tmp_path / "res", *flags, check=False)
    assert_fails(proc, fragment)
    assert not (tmp_path / "res").exists()


def test_long_runs_report_progress_without_a_terminal(trained_run, stack, tmp_path, monkeypatch, capsys):
    import predict_unet_test
    from isbi_unet import volume

    monkeypatch.setattr(volume, "QUIET_SECONDS", 0)  # a line per tenth from the start (10 s of quiet otherwise)
    args = ["--checkpoint", trained_run / "best", "--Test_Data_path", stack, "--save_res_path", tmp_path / "res"]
    predict_unet_test.main([str(a) for a in [*args, "--workers", 1, "--tile", 48, "--engine", "oneflow"]])
    progress = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("predicted ")]
    assert [words[1] for words in progress] == [f"{p}%" for p in range(10, 101, 10)]
    assert progress[-1][2:6] == ["(0.3", "of", "0.3", "Mpx,"] and "Mpx/s," in progress[-1]


class OneAtATime(LocalExecutor):
    """Runs each block at submit time but hands back one per done(), as a busy cluster would: how many the engine
    keeps in flight shows."""

    workers = 8

    def __init__(self):
        self.most = 0

    def done(self, futures):
        self.most = max(self.most, len(futures))
        return futures[:1]


def test_a_cluster_gets_no_more_blocks_in_flight_than_the_budget_holds(trained_run, stack, tmp_path):
    from isbi_unet.predictor import Spec

    source = open_source(stack)
    shapes = [source.shape(z) for z in range(3)]
    blocks = plan_volume(source, 32)[: 3 * 9]
    runs = {}
    for limit in (None, 3):
        sink, executor = ArraySink(shapes), OneAtATime()
        journal = Journal(str(tmp_path / f"{limit}.journal"), {})
        run_blocks(source, blocks, Spec((str(trained_run / "best"),)), [sink], executor, journal, False, limit)
        runs[limit] = executor.most, [sink.probs[z] for z in range(3)]
    assert runs[None][0] == 16 and runs[3][0] == 3  # 2 per worker thread, unless the budget holds fewer
    for a, b in zip(runs[None][1], runs[3][1]):
        np.testing.assert_array_equal(a, b)


def test_the_blocks_in_flight_on_a_cluster_follow_the_budget():
    from isbi_unet.volume import windows_in_flight

    # 2.75 GB, less the process (0.37 GB) and 8 B per pixel of the 2048x2048 slice, over a 1216x1216 window and a
    # 1024x1024 result in float32
    assert windows_in_flight(2.75, 1024, [(2048, 2048)]) == int(
        (2.75e9 - 0.37e9 - 8 * 2048**2) // (4 * (1216**2 + 1024**2))
    )
    assert windows_in_flight(8, 1024, [(2048, 2048)]) > windows_in_flight(2.75, 1024, [(2048, 2048)]) > 100
    assert windows_in_flight(0.1, 1024, [(2048, 2048)]) == 1  # never none: the run goes on, one block at a time
    assert windows_in_flight(2.75, 512, [(100, 100)]) > windows_in_flight(2.75, 512, [(512, 512)])  # small slices


def test_window_folders_of_killed_runs_are_swept(tmp_path, monkeypatch):
    import tempfile

    from isbi_unet import volume

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = os.fork()  # a pid that has ended (Popen would be skipped under --fast)
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    names = [f"{volume.SCRATCH}{gone}-abc", f"{volume.SCRATCH}{os.getpid()}-def", f"{volume.SCRATCH}old", "mine"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.npy").write_bytes(b"x")
    recent = f"{volume.SCRATCH}{gone}-new"  # a dead pid, but written to a minute ago: perhaps another namespace's
    (tmp_path / recent).mkdir()
    for name in names:
        os.utime(tmp_path / name, (time.time() - 7200,) * 2)
    os.utime(tmp_path / recent, (time.time() - 60,) * 2)
    volume.sweep_scratch()
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:] + [recent])
