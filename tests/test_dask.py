"""Prediction on a Dask cluster (predict_unet_test.py --scheduler, isbi_unet/cluster.py), rehearsed as the training's
several machines are: the scheduler and the predicting command on one node, a `dask worker` on each of two others,
each node in its own network namespace (tools/netns.py) with its own address. Two workers give the one-process
answer bit for bit; a worker killed mid-run has its blocks redone and changes nothing. A scheduler that does not
answer, one without workers, one that cannot load this repository's code, and a worker that cannot load the model
(its machine lacks the file: the checkpoint hidden under an empty tmpfs in its own mount namespace) are one line
each, in bounded time.

The clusters are real `dask scheduler` / `dask worker` processes, each in its own process group, killed with it
however a test ends; the namespaces go with everything still inside them. Namespaces and mount namespaces need
root (CI runs as root); where they cannot be made those tests are skipped with the reason.
"""

import os
import shutil
import sys
import time

import numpy as np
import pytest

from conftest import (
    REPO,
    assert_fails,
    free_port,
    make_slice,
    node_namespaces,
    predict_script,
    wait_for_blocks,
    write_omezarr,
)
from tools import netns

zarr = pytest.importorskip("zarr")  # requirements-volumes.txt installs only on CPython 3.10+
pytest.importorskip("distributed")

DASK = os.path.join(os.path.dirname(sys.executable), "dask")  # the venv's `dask` command
PREFIX = f"isbid{os.getpid()}"
SUBNET = "10.201.0"
PORT = 8786  # Dask's own default: free in a namespace made for the test
START = 120  # seconds a scheduler or worker may take to start (two cores shared with the rest of the suite)
RUN = 300  # seconds a prediction may take
FLAGS = ["--device", "cpu", "--tile", "32"]  # blocks of 32 px: many small blocks (and the same ones in every run)


def dask_env():
    """What `dask scheduler` and `dask worker` need on every machine: this repository on the PYTHONPATH (they
    unpickle its functions)."""
    return {"PYTHONPATH": REPO}


def wait_for_line(proc, words, timeout=START):
    """Waits until `words` appear in `proc`'s log; fails with the log when it ends or `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = proc.log.read_text()
        if words in text:
            return text
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before saying {words!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"no {words!r} after {timeout} s:\n{proc.log.read_text()}")


def start_scheduler(procs, host, port, namespace=None, tmp=None, env=None):
    proc = procs.start(
        f"scheduler-{host}-{port}",
        [DASK, "scheduler", "--host", host, "--port", port, "--no-dashboard"],
        env=dask_env() if env is None else env,
        cwd=tmp,
        namespace=namespace,
    )
    wait_for_line(proc, "Scheduler at:")
    return proc


def start_worker(procs, name, address, host, namespace=None, tmp=None, hide=None):
    """A `dask worker` with one thread; `hide`: a folder it sees empty (a machine without that file)."""
    cmd = [DASK, "worker", address, "--nthreads", 1, "--host", host, "--no-dashboard", "--no-nanny"]
    if hide:
        mount = f"mount -t tmpfs tmpfs {hide} && exec {' '.join(map(str, cmd))}"
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount]
    proc = procs.start(name, cmd, env=dask_env(), cwd=tmp, namespace=namespace)
    wait_for_line(proc, "Registered to:")
    return proc


def write_volume(path, depth, size=96, seed=0):
    rng = np.random.default_rng(seed)
    image = np.stack([make_slice(rng, (size, size))[0] for _ in range(depth)])
    return write_omezarr(path, image, chunks=(1, 48, 48))


def read_zarr(path):
    return zarr.open_array(os.path.join(path, "0"), mode="r")[:]


def read_submission(path):
    import tifffile

    return tifffile.imread(os.path.join(path, "submission.tif"))


def assert_same_result(res, ref):
    """The same probabilities (float32, every bit) and the same OME-Zarr maps as the one-process run."""
    got, want = read_submission(res), read_submission(ref)
    assert got.shape == want.shape and np.abs(got - want).max() == 0
    for name in ("prob.ome.zarr", "mask.ome.zarr"):
        np.testing.assert_array_equal(read_zarr(os.path.join(res, name)), read_zarr(os.path.join(ref, name)))


@pytest.fixture(scope="module")
def nodes():
    """Node 0 (scheduler, predicting command), nodes 1 and 2 (a worker each); removed after the module's tests."""
    yield from node_namespaces(3, PREFIX, SUBNET)


@pytest.fixture(scope="module")
def checkpoint(trained_run, tmp_path_factory):
    """The tiny trained model at a path every node sees (one file system, as a cluster's shared storage)."""
    return shutil.copytree(trained_run / "last", tmp_path_factory.mktemp("model") / "last")


@pytest.fixture
def cluster(nodes, procs, tmp_path):
    """`dask scheduler` on node 0 and `dask worker` on nodes 1 and 2, as docs/volumes.md starts them."""
    address = f"tcp://{netns.address(0, SUBNET)}:{PORT}"
    scheduler = start_scheduler(procs, netns.address(0, SUBNET), PORT, nodes[0], tmp_path)
    workers = [start_worker(procs, f"worker{i}", address, netns.address(i, SUBNET), nodes[i], tmp_path) for i in (1, 2)]
    return address, scheduler, workers


def predict_on_cluster(procs, nodes, address, checkpoint, volume, res, name="predict"):
    """The README's command on node 0, the scheduler's machine."""
    args = ["--checkpoint", checkpoint, "--Test_Data_path", volume, "--save_res_path", res, *FLAGS]
    return procs.start(
        name, [sys.executable, "predict_unet_test.py", *args, "--scheduler", address], namespace=nodes[0]
    )


@pytest.mark.slow
def test_two_workers_on_two_machines_give_the_one_process_answer(cluster, nodes, procs, checkpoint, tmp_path):
    address, _, _ = cluster
    volume = write_volume(tmp_path / "volume.ome.zarr", depth=4)
    ref = tmp_path / "ref"
    predict_script(checkpoint, volume, ref, *FLAGS, "--workers", 1)
    run = predict_on_cluster(procs, nodes, address, checkpoint, volume, tmp_path / "res")
    code, out = procs.wait(run, RUN)
    assert code == 0, out
    assert_same_result(tmp_path / "res", ref)
    assert f"Dask cluster {address}" in out  # the summary names where the blocks ran


@pytest.mark.slow
def test_a_worker_killed_mid_run_has_its_blocks_redone_and_changes_nothing(cluster, nodes, procs, checkpoint, tmp_path):
    address, scheduler, workers = cluster
    volume = write_volume(tmp_path / "volume.ome.zarr", depth=16)
    ref = tmp_path / "ref"
    predict_script(checkpoint, volume, ref, *FLAGS, "--workers", 1)
    run = predict_on_cluster(procs, nodes, address, checkpoint, volume, tmp_path / "res")
    wait_for_blocks(run, tmp_path / "res", 20, RUN)  # of 144: both workers have the model and blocks in hand
    procs.kill(workers[1])  # node 2's worker, as a machine that goes away
    assert run.poll() is None, run.log.read_text()  # killed mid-run
    code, out = procs.wait(run, RUN)
    assert code == 0, out
    assert_same_result(tmp_path / "res", ref)
    lost = f"Remove worker addr: tcp://{netns.address(2, SUBNET)}:"
    assert lost in scheduler.log.read_text()  # the scheduler saw it go (and gave its blocks to node 1's)


# ------------------------------------------------------------------------------------------ bad clusters, one line


@pytest.mark.slow
def test_no_scheduler_is_one_line_in_bounded_time(checkpoint, tmp_path):
    volume = write_volume(tmp_path / "volume.ome.zarr", depth=1)
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = predict_script(
        checkpoint, volume, tmp_path / "res", "--scheduler", address, "--scheduler_timeout", 2, check=False
    )
    assert_fails(proc, address, "no Dask scheduler answered within 2 s")
    assert time.monotonic() - t0 < 60
    assert not os.path.exists(tmp_path / "res")  # refused before anything is written
    assert_fails(predict_script(checkpoint, volume, tmp_path / "res", "--scheduler", "nowhere", check=False), "nowhere")


def test_a_scheduler_without_workers_is_one_line(checkpoint, procs, tmp_path):
    volume = write_volume(tmp_path / "volume.ome.zarr", depth=1)
    port = free_port()
    start_scheduler(procs, "127.0.0.1", port, tmp=tmp_path)
    address = f"tcp://127.0.0.1:{port}"
    proc = predict_script(
        checkpoint, volume, tmp_path / "res", "--scheduler", address, "--scheduler_timeout", 3, check=False
    )
    assert_fails(proc, address, "the Dask scheduler has no workers (waited 3 s)", f"dask worker {address}")


def test_a_worker_that_cannot_load_the_model_is_one_line_naming_it(checkpoint, procs, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a worker without the model file is simulated in a mount namespace: needs root and unshare")
    volume = write_volume(tmp_path / "volume.ome.zarr", depth=1)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    start_scheduler(procs, "127.0.0.1", port, tmp=tmp_path)
    worker = start_worker(procs, "worker", address, "127.0.0.1", tmp=tmp_path, hide=checkpoint)
    proc = predict_script(checkpoint, volume, tmp_path / "res", "--scheduler", address, check=False)
    assert_fails(proc, "Dask worker tcp://127.0.0.1:", str(checkpoint))
    assert worker.poll() is None  # the worker itself carries on, for other jobs


def test_a_scheduler_without_this_repository_on_its_pythonpath_is_one_line_saying_so(checkpoint, procs, tmp_path):
    volume = write_volume(tmp_path / "volume.ome.zarr", depth=1)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    start_scheduler(procs, "127.0.0.1", port, tmp=tmp_path, env={"PYTHONPATH": ""})
    start_worker(procs, "worker", address, "127.0.0.1", tmp=tmp_path)
    proc = predict_script(checkpoint, volume, tmp_path / "res", "--scheduler", address, check=False)
    assert_fails(proc, address, "cannot load this repository's code", "need it on their PYTHONPATH")
