"""get_data.py: copy from a local folder, download over HTTP (a loopback server here), never half-install."""

import functools
import http.server
import os
import shutil
import threading

import pytest

from conftest import assert_fails, run, snapshot, write_dataset


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
    assert [n for n in os.listdir(tmp_path / "data") if n.startswith(".incoming")] == []


def test_failed_download_leaves_nothing(tmp_path, server):
    root, url = server
    os.remove(os.path.join(root, "test", "29.png"))  # the very last file is missing
    proc = run(
        "get_data.py", "--data_dir", tmp_path / "data", "--source", tmp_path / "absent", "--url", url, check=False
    )
    assert_fails(proc, "test/29.png: download failed")
    assert not (tmp_path / "data").exists()  # not even the folder it made


def test_non_binary_labels_are_rejected(tmp_path):
    import cv2
    import numpy as np

    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=1)
    cv2.imwrite(os.path.join(source, "train/label/1.png"), np.full((48, 48), 128, np.uint8))
    proc = run("get_data.py", "--data_dir", tmp_path / "data", "--source", source, check=False)
    assert_fails(proc, f"{source}/train/label/1.png: not a binary label")
    assert not (tmp_path / "data").exists()  # not even the folder it made


def test_conversion_warnings_name_the_source_not_the_staging_copy(tmp_path):
    import cv2

    source = write_dataset(str(tmp_path / "src"), n_train=2, n_test=1)
    image = cv2.imread(os.path.join(source, "train/image/0.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(os.path.join(source, "train/image/0.png"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    proc = run("get_data.py", "--data_dir", tmp_path / "data", "--source", source)
    assert proc.stderr.splitlines()[-1] == f"warning: {source}/train/image/0.png: RGB image converted to grayscale"
    assert ".incoming" not in proc.stderr


def test_a_users_own_slices_are_never_replaced_or_mixed(tmp_path):
    """train/ of the user's own but no test/: nothing is written, and one warning names what was found."""
    source = write_dataset(str(tmp_path / "src"), n_train=4, n_test=2)
    data = tmp_path / "data"
    write_dataset(str(data), n_train=3, n_test=0, seed=7)
    (data / "test").rmdir()
    before = snapshot(data)
    proc = run("get_data.py", "--data_dir", data, "--source", source)
    assert snapshot(data) == before and not (data / "test").exists()
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and f"{data}/train/image" in warning[0] and "--data_dir" in warning[0]


def test_its_own_incomplete_data_is_refilled(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=4, n_test=2)
    data = tmp_path / "data"
    run("get_data.py", "--data_dir", data, "--source", source)
    os.remove(data / "train" / "label" / "1.png")  # an image without its label: incomplete
    proc = run("get_data.py", "--data_dir", data, "--source", source)
    assert "4 labeled training slices and 2 test slices" in proc.stdout
    assert sorted(os.listdir(data / "train" / "label")) == ["0.png", "1.png", "2.png", "3.png"]


def test_a_file_the_user_added_to_its_folder_makes_the_folder_theirs(tmp_path):
    source = write_dataset(str(tmp_path / "src"), n_train=4, n_test=2)
    data = tmp_path / "data"
    run("get_data.py", "--data_dir", data, "--source", source)
    shutil.copy(data / "test" / "0.png", data / "test" / "mine.png")
    shutil.rmtree(data / "train" / "label")  # incomplete now, so get_data.py would refill it
    before = snapshot(data)
    proc = run("get_data.py", "--data_dir", data, "--source", source)
    assert snapshot(data) == before
    assert f"{data}/test" in proc.stderr and "warning: " in proc.stderr
