"""Every script honours Ctrl-C at any moment: one line and exit 130, or (when it came too late) a finished run;
never a traceback, and nothing half-written that a later command could take for complete."""

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from test_dead_rank import wait_until
from test_interrupt import stderr_lines

from conftest import REPO, write_dataset


def start(*args):
    # its own session: a signal to its group is what a terminal's Ctrl-C sends
    cmd = [sys.executable, *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def importing(proc):
    """Whether the script is past Python's own start: NumPy's C core is mapped (its first import, of many). A Ctrl-C
    before that ends Python itself, before anything could be written."""
    try:
        with open(f"/proc/{proc.pid}/maps") as f:
            return "_multiarray_umath" in f.read()
    except OSError:
        return False


def ctrl_c(proc, after=None, when=None):
    """Ctrl-C once `when()` holds, or `after` seconds into the script's imports and work; returns (exit code,
    stderr lines)."""
    if when is not None:
        wait_until(lambda: when() or proc.poll() is not None, 120, "the script to be at work")
    else:
        wait_until(lambda: importing(proc) or proc.poll() is not None, 60, "the script's imports")
        time.sleep(after)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr_lines(stderr)


def assert_one_line_or_finished(code, lines):
    assert (code, lines) == (0, []) or (
        code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted")
    ), (
        code,
        lines,
    )


@pytest.fixture
def slow_server(tmp_path):
    """The public copy's layout on loopback, each file served after a pause: a download that takes a while."""
    root = write_dataset(str(tmp_path / "served"), n_train=30, n_test=30, size=(20, 20))

    class Slow(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.1)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=root))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{{part}}/{{i}}.png"
    httpd.shutdown()


def test_get_data_stopped_mid_download_leaves_no_data(tmp_path, slow_server):
    data = tmp_path / "data"
    proc = start("get_data.py", "--data_dir", data, "--source", tmp_path / "absent", "--url", slow_server)
    code, lines = ctrl_c(
        proc, when=lambda: any(n.startswith(".incoming") for n in os.listdir(data)) if data.exists() else False
    )
    assert code == 130 and lines == ["error: interrupted"], lines
    assert not data.exists()  # no parts, no staging folder, not even the folder it made


def big_results(tmp_path, n=24, size=512):
    """Masks and probability maps of N large slices, as predict_unet_test.py leaves them."""
    data = write_dataset(str(tmp_path / "data"), n_train=n, n_test=0, size=(size, size))
    res = tmp_path / "res"
    os.makedirs(res / "prob")
    for i in range(n):
        label = cv2.imread(f"{data}/train/label/{i}.png", cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(res / f"{i}.png"), label)
        cv2.imwrite(str(res / "prob" / f"{i}.png"), np.clip(label.astype(int) // 2 + 60, 0, 255).astype(np.uint8))
    record = {"args": {"Test_Data_path": f"{data}/train/image"}, "finished": True, "outputs": ["prob"]}
    (res / "run.json").write_text(json.dumps(record))
    return data, res


def test_visualize_stopped_mid_way_leaves_overlays_marked_unfinished_and_a_rerun_replaces_them(tmp_path):
    data, res = big_results(tmp_path)
    overlays = res / "overlay"
    proc = start("visualize.py", "--res_path", res, "--n", 24)
    code, lines = ctrl_c(proc, when=lambda: overlays.is_dir() and len(os.listdir(overlays)) >= 3)
    assert_one_line_or_finished(code, lines)
    if code == 130:
        assert json.loads((overlays / "overlay.json").read_text())["finished"] is False
        assert not (res / "figure.png").exists()
    rerun = subprocess.run([sys.executable, "visualize.py", "--res_path", str(res), "--n", "2"], cwd=REPO)
    assert rerun.returncode == 0 and sorted(os.listdir(overlays)) == ["0.png", "1.png", "overlay.json"]


@pytest.mark.parametrize("after", [0.0, 0.3, 1.0])
def test_evaluate_and_plot_at_any_moment(tmp_path, after):
    data, res = big_results(tmp_path, n=12)
    proc = start("evaluate.py", "--prob_dir", res / "prob", "--label_dir", f"{data}/train/label")
    assert_one_line_or_finished(*ctrl_c(proc, after=after))
    (tmp_path / "log.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
    proc = start("plot.py", "--log", tmp_path / "log.csv")
    code, lines = ctrl_c(proc, after=after)
    assert_one_line_or_finished(code, lines)
    assert os.listdir(tmp_path) and [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary
