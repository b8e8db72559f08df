"""Shared fixtures: tiny synthetic ISBI-like data on disk and a runner for the repo's real scripts."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_slice(rng, size):
    """A membrane-like image: dark lines on a bright textured background, and its label (255 = cell)."""
    h, w = size
    label = np.full((h, w), 255, np.uint8)
    for _ in range(3):
        cv2.line(
            label, tuple(int(v) for v in rng.integers(0, w, 2)), tuple(int(v) for v in rng.integers(0, h, 2)), 0, 2
        )
    image = np.where(label == 255, 180, 40).astype(np.int16) + rng.integers(-30, 30, (h, w))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_dataset(root, n_train=6, n_test=3, size=(48, 48), seed=0):
    rng = np.random.default_rng(seed)
    for sub in ("train/image", "train/label", "test"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n_train):
        image, label = make_slice(rng, size)
        cv2.imwrite(os.path.join(root, "train/image", f"{i}.png"), image)
        cv2.imwrite(os.path.join(root, "train/label", f"{i}.png"), label)
    for i in range(n_test):
        cv2.imwrite(os.path.join(root, "test", f"{i}.png"), make_slice(rng, size)[0])
    return root


def repo_python_files(skip=("tests",)):
    """Relative paths of the repo's own .py files: hidden folders (.git, .venv, .venv-torch) and `skip` left out."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
        found += [os.path.relpath(os.path.join(folder, n), REPO) for n in files if n.endswith(".py")]
    return sorted(found)


def path_without_python(tmp_path):
    """A PATH for setup.sh with the tools it uses and a `python3` that fails, as on a machine whose only Python
    is of the wrong version (or, on a machine with the right one, pretends to be)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "ls", "sort", "cat", "grep", "sha256sum", "cut", "dirname", "rm"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python3").chmod(0o755)
    return str(bin_dir)


def user_checkout(root, n_train=6, n_test=1):
    """A copy of the code at `root` with a link to the venv and tiny data in data/: the shell scripts run
    there as a user runs them (setup.sh finds the venv up to date), touching nothing in this checkout."""
    root = Path(root)
    shutil.copytree(
        REPO,
        root,
        ignore=shutil.ignore_patterns(".git", ".venv", ".venv-torch", "data", "checkpoints", "__pycache__", "*cache*"),
    )
    os.symlink(os.path.realpath(os.path.join(REPO, ".venv")), root / ".venv")
    write_dataset(str(root / "data"), n_train=n_train, n_test=n_test)
    return root


@pytest.fixture
def data(tmp_path):
    return write_dataset(str(tmp_path / "data"))


def run(*args, check=True, timeout=600):
    """`python3 ARGS...` in the repo with this interpreter, e.g. run("plot.py", "--log", path)."""
    cmd = [sys.executable, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# OneFlow 0.9.0 prints this at import on every machine without InfiniBand; it is not ours to silence.
ONEFLOW_BANNER = "libibverbs not available, ibv_fork_init skipped"
# ... and its C++ log lines (glog: `W20261207 20:07:31.598440 11677 cuda_device_descriptor_class.cpp:48] CUDA driver
# version is insufficient ...` on a machine with CUDA libraries and no GPU), once it has set up its devices.
ONEFLOW_LOG = re.compile(r"^[IWE]\d{8} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def assert_fails(proc, *fragments):
    """Exit code 2 and exactly one `error: ...` line on stderr containing every fragment."""
    assert proc.returncode == 2, proc.stderr
    lines = [
        line for line in proc.stderr.strip().splitlines() if line != ONEFLOW_BANNER and not ONEFLOW_LOG.match(line)
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def write_omezarr(path, image, axes="zyx", chunks=None, transforms=None, **options):
    """`image` as an OME-Zarr image (NGFF 0.4, one level) at `path`, written by ome-zarr-py as other tools write
    it: chunks of one slice by 32 x 32 unless given, a scale of 4 per pixel (50 along z) unless `transforms`."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    if transforms is None:
        scale = [50.0 if a == "z" else 1.0 for a in axes[:-2]] + [4.0, 4.0]
        transforms = [[{"type": "scale", "scale": scale}]]
    group = zarr.group(parse_url(str(path), mode="w").store)
    storage = {"chunks": chunks or (1,) * (image.ndim - 2) + (32, 32), **options}
    write_image(image, group, axes=axes, storage_options=storage, scaler=None, coordinate_transformations=transforms)
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Started commands, each in its own session, output to a file (a pipe would be held open by a stray rank)."""

    def __init__(self, folder):
        self.folder, self.procs = folder, []

    def start(self, name, cmd, env=None, cwd=REPO, namespace=None):
        if namespace:
            cmd = ["ip", "netns", "exec", namespace, *cmd]
        log = self.folder / f"{name}.txt"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log = log
        self.procs.append(proc)
        return proc

    def wait(self, proc, timeout):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{proc.log.read_text()}") from None
        return proc.returncode, proc.log.read_text()

    def kill(self, proc):
        """Ends `proc` and everything it started (its session), at once."""
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def kill_all(self):
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.kill_all()


def wait_for_blocks(proc, folder, count, timeout=300):
    """Waits until the prediction `proc` (into `folder`) has finished `count` blocks by its journal
    (isbi_unet/volume.py: a fingerprint line, then a line per finished block); fails if it ends first."""
    from isbi_unet.volume import JOURNAL

    journal, deadline = Path(folder) / JOURNAL, time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = journal.read_text().count("\n") if journal.is_file() else 0
        if lines - 1 >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before {count} blocks were finished")
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} blocks finished after {timeout} s")


def node_namespaces(count, prefix, subnet=None):
    """Yields `count` node namespaces PREFIX-n0 ... (tools/netns.py), addresses SUBNET.1 ...; removed, with every
    process still inside, when the generator ends (a module fixture's `yield from`). Skips where they cannot
    be made (not root, no iproute2)."""
    from tools import netns

    why = netns.unavailable()
    if why:
        pytest.skip(f"no simulated nodes: {why}")
    try:
        names = netns.up(count, prefix, subnet or netns.SUBNET)
    except OSError as e:
        pytest.skip(f"no simulated nodes: network namespaces cannot be made here ({e})")
    try:
        yield names
    finally:
        netns.down(prefix)
        assert netns.namespaces(prefix) == []


# One sample per slice keeps step counts equal to slices / batch, which several tests count on.
TINY = [
    "--width",
    "4",
    "--crop_size",
    "32",
    "--samples_per_slice",
    "1",
    "--batch_size",
    "2",
    "--val_slices",
    "2",
    "--device",
    "cpu",
]


def train_in_process(*args):
    """TrainUnetDataSet.main on ARGS in this process (for tests where the process boundary is not the point)."""
    from TrainUnetDataSet import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One real epoch of TINY training on `write_dataset`'s data, made once for the whole session."""
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(str(root / "data"))
    train_in_process("--data_path", f"{data}/train", "--epochs", 1, "--checkpoint_dir", root / "ckpt", *TINY)
    return root / "ckpt"


@pytest.fixture(scope="session")
def bilinear(tmp_path_factory):
    """A checkpoint of a bilinear U-Net (untrained), which OneFlow's ONNX converter cannot take."""
    import oneflow as flow

    from isbi_unet.checkpoint import save_checkpoint
    from unet import UNet

    flow.manual_seed(0)
    path = tmp_path_factory.mktemp("bilinear") / "ckpt"
    save_checkpoint(path, UNet(1, 1, bilinear=True, width=4), epoch=0)
    return path


@pytest.fixture
def trained(trained_run, tmp_path):
    """This test's own copy of trained_run's checkpoint folder (trained on the same data as `data`)."""
    return shutil.copytree(trained_run, tmp_path / "trained")


def train_script(data_path, ckpt, *flags, epochs=1, check=True):
    """`TrainUnetDataSet.py --data_path DATA_PATH --epochs EPOCHS --checkpoint_dir CKPT`, TINY's flags, then FLAGS
    (argparse keeps the last value of a flag, so FLAGS override TINY)."""
    args = ["--data_path", data_path, "--epochs", epochs, "--checkpoint_dir", ckpt]
    return run("TrainUnetDataSet.py", *args, *TINY, *flags, check=check)


def predict_script(checkpoint, images, res, *flags, check=True):
    """`predict_unet_test.py --checkpoint CHECKPOINT --Test_Data_path IMAGES --save_res_path RES FLAGS...`."""
    args = ["--checkpoint", checkpoint, "--Test_Data_path", images, "--save_res_path", res]
    return run("predict_unet_test.py", *args, *flags, check=check)


def snapshot(folder):
    """Every file under folder with its bytes, to show that a refused run changed nothing."""
    return {str(p): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def pytest_addoption(parser):
    parser.addoption(
        "--fast", action="store_true", help="the edit-test loop's tier: skip every test that starts a process"
    )
    parser.addoption("--all", action="store_true", help="also the slow tier: the longest end-to-end tests (CI runs it)")


def pytest_configure(config):
    """Under --fast, starting any program but git (which run records ask for the commit) skips the test or
    fixture that asked for it: scripts, launchers and network namespaces are the slow part of the suite."""
    config.addinivalue_line("markers", "heavy: trains for real in the test process; skipped under --fast")
    config.addinivalue_line("markers", "slow: one of the longest end-to-end tests (30-50 s each); only with --all")
    if not config.getoption("--fast"):
        return
    config.option.reportchars = config.option.reportchars.replace("s", "")  # one line below says why instead
    start = subprocess.Popen.__init__

    def start_unless_a_script(self, args, *rest, **kwargs):
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args).split()[0])
        if program != "git":
            pytest.skip("starts a process: only in the full suite (bash tests/run.sh)")
        start(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = start_unless_a_script


def pytest_collection_modifyitems(config, items):
    """Under --fast, tests marked heavy (real training in this process) are skipped too: they are the full suite's.
    Tests marked slow run only with --all (what CI runs): the full suite stays within about 15 minutes."""
    for item in items:
        if config.getoption("--fast") and item.get_closest_marker("heavy"):
            item.add_marker(pytest.mark.skip(reason="heavy: only in the full suite (bash tests/run.sh)"))
        elif item.get_closest_marker("slow") and not config.getoption("--all"):
            item.add_marker(pytest.mark.skip(reason="slow: only with --all (bash tests/run.sh --all, as CI runs)"))


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("--fast"):
        skipped = len(terminalreporter.stats.get("skipped", []))
        terminalreporter.write_line(
            f"--fast: {skipped} tests skipped, as they start a process; bash tests/run.sh runs all"
        )
