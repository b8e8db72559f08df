"""get_data.py: copy from a local folder, download over HTTP (a loopback server here), never half-install."""

import functools
import http.server
import os
import threading

import pytest

from conftest import assert_fails, run, write_dataset


@pytest.fixture
def server(tmp_path):
    """Serves a 30 + 30 slice dataset laid out like the public copy; yields its URL template."""
    root = write_dataset(str(tmp_path / "served"), n_train=30, n_test=30, size=(20, 20))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/{{part}}/{{i}}.png"
    httpd.shutdown()


def test_copies_from_a_local_folder(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=4, n_test=2)
    out = run("get_data.py", "--data_dir", tmp_path / "data", "--source", source).stdout
    assert "4 labeled training slices and 2 test slices" in out
    assert sorted(os.listdir(tmp_path / "data" / "train" / "label")) == ["0.png", "1.png", "2.png", "3.png"]
    # complete data is left alone
    assert run("get_data.py", "--data_dir", tmp_path / "data", "--source", source).stdout == ""


def test_downloads_when_no_local_copy(tmp_path, server):
    _, url = server
    out = run("get_data.py", "--data_dir", tmp_path / "data", "--source", tmp_path / "absent", "--url", url).stdout
    assert "downloading" in out and "30 labeled training slices and 30 test slices" in out
    assert [n for n in os.listdir(tmp_path / "data") if n.startswith(".")] == []


def test_failed_download_leaves_nothing(tmp_path, server):
    root, url = server
    os.remove(os.path.join(root, "test", "29.png"))  # the very last file is missing
    proc = run(
        "get_data.py", "--data_dir", tmp_path / "data", "--source", tmp_path / "absent", "--url", url, check=False
    )
    assert_fails(proc, "test/29.png: download failed")
    assert os.listdir(tmp_path / "data") == []


def test_non_binary_labels_are_rejected(tmp_path):
    import cv2
    import numpy as np

    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=1)
    cv2.imwrite(os.path.join(source, "train/label/1.png"), np.full((48, 48), 128, np.uint8))
    proc = run("get_data.py", "--data_dir", tmp_path / "data", "--source", source, check=False)
    assert_fails(proc, f"{source}/train/label/1.png: not a binary label")
    assert os.listdir(tmp_path / "data") == []


def test_conversion_warnings_name_the_source_not_the_staging_copy(tmp_path):
    import cv2

    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=1)
    image = cv2.imread(os.path.join(source, "train/image/0.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(os.path.join(source, "train/image/0.png"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    proc = run("get_data.py", "--data_dir", tmp_path / "data", "--source", source)
    assert proc.stderr.splitlines()[-1] == f"warning: {source}/train/image/0.png: RGB image converted to grayscale"
    assert ".incoming" not in proc.stderr
