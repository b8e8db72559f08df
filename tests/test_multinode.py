"""Several machines, rehearsed on one: each node in its own network namespace with its own address
(tools/netns.py), the README's commands on each. Two nodes x one process, and x two, train, end with
identical weights, only global rank 0 writes, and --resume continues on both; a node that never joins
ends the others with one line and exit 2 (--join_timeout), a wrong --nnodes or a taken --node_rank is
refused at once; a frozen node ends the others (--step_timeout).

Namespaces need root and iproute2 (CI runs as root); where they cannot be made those tests are skipped
with the reason. The join tests need no namespace: before OneFlow starts, "nodes" on one address do not
collide. Every process runs in its own session, is killed with its group when a test ends however it
ends, and the namespaces go with everything still inside them (tools/netns.down).
"""

import os
import shutil
import signal
import socket
import sys
import time

import numpy as np
import pytest

from conftest import TINY, free_port, node_namespaces, user_checkout, write_dataset
from tools import netns

MASTER_PORT = 29500  # free in a namespace made for the test
PREFIX = f"isbit{os.getpid()}"
DATA_FLAGS = ["--data_path", "data/train"]


LAUNCHER = "isbi_unet.launch"  # what train.sh runs: OneFlow's launcher, exiting with the ranks' own code


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def nodes():
    """Two node namespaces, PREFIX-n0 (10.200.0.1) and PREFIX-n1 (10.200.0.2); removed after the module's tests."""
    yield from node_namespaces(2, PREFIX)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """The code, a link to the venv and tiny data in data/: train.sh runs as a user runs it, touching nothing here."""
    return user_checkout(tmp_path_factory.mktemp("node") / "repo")


def node_env(rank, nproc, nnodes=2):
    return dict(
        NNODES=str(nnodes),
        NODE_RANK=str(rank),
        MASTER_ADDR=netns.address(0),
        MASTER_PORT=str(MASTER_PORT),
        NPROC=str(nproc),
    )


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.slow
def test_two_nodes_train_identically_only_rank0_writes_and_resume(nodes, repo_copy, procs, tmp_path, nproc):
    # The README's command for each node: NNODES=2 NODE_RANK=R MASTER_ADDR=... MASTER_PORT=... bash train.sh FLAGS
    ckpt = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]  # two machines' disks
    runs = [
        procs.start(
            f"train{r}",
            ["bash", "train.sh", *DATA_FLAGS, "--epochs", 2, "--checkpoint_dir", ckpt[r], *TINY],
            env=node_env(r, nproc),
            cwd=repo_copy,
            namespace=nodes[r],
        )
        for r in (0, 1)
    ]
    (rc0, out0), (rc1, out1) = (procs.wait(p, 180) for p in runs)
    assert rc0 == 0 and rc1 == 0, out0 + out1
    launch = f"--nnodes 2 --node_rank 0 --master_addr {netns.address(0)} --master_port {MASTER_PORT}"
    assert f"train.sh: {nproc} processes through isbi_unet.launch (OneFlow's launcher) {launch}" in out0  # env passed
    assert f"batch 2 x {2 * nproc} process(es)" in out0 and out0.count("epoch   2/2") == 1
    assert "epoch" not in out1  # rank 1 prints nothing of its own
    assert len((ckpt[0] / "log.csv").read_text().splitlines()) == 3
    assert os.path.isfile(ckpt[0] / "last" / "pickled_data")
    assert not os.path.exists(ckpt[1])  # only global rank 0 writes

    # Node 1 gets a copy of `last` (or shared storage); --resume continues on both, and every rank dumps its weights.
    shutil.copytree(ckpt[0], ckpt[1])
    resumed = [
        procs.start(
            f"resume{r}",
            [
                sys.executable,
                "-m",
                LAUNCHER,
                *launch.replace("node_rank 0", f"node_rank {r}").split(),
                "--nproc_per_node",
                nproc,
                "tests/ddp_worker.py",
                tmp_path,
                *DATA_FLAGS,
                "--resume",
                ckpt[r] / "last",
                "--epochs",
                3,
                *TINY,
            ],
            cwd=repo_copy,
            namespace=nodes[r],
        )
        for r in (0, 1)
    ]
    (rc0, out0), (rc1, out1) = (procs.wait(p, 180) for p in resumed)
    assert rc0 == 0 and rc1 == 0, out0 + out1
    assert "epoch   3/3" in out0 and "epoch   2/3" not in out0
    assert len((ckpt[0] / "log.csv").read_text().splitlines()) == 4
    assert len((ckpt[1] / "log.csv").read_text().splitlines()) == 3  # node 1's copy untouched: its ranks never write
    dumps = [np.load(tmp_path / f"rank{r}.npz") for r in range(2 * nproc)]
    assert len(dumps[0].files) > 50
    for other in dumps[1:]:
        assert sorted(other.files) == sorted(dumps[0].files)
        for key in dumps[0].files:
            np.testing.assert_array_equal(other[key], dumps[0][key], err_msg=key)


def launch_node(procs, rank, nnodes, port, *flags, name=None):
    """A node on 127.0.0.1: the launcher with --nnodes/--node_rank, one process, TrainUnetDataSet.py FLAGS."""
    cmd = [
        sys.executable,
        "-m",
        LAUNCHER,
        "--nnodes",
        nnodes,
        "--node_rank",
        rank,
        "--nproc_per_node",
        1,
        "--master_port",
        port,
        "TrainUnetDataSet.py",
        *flags,
    ]
    return procs.start(name or f"node{rank}", cmd)


def test_node0_alone_ends_with_one_line_and_exit_2(data, procs, tmp_path):
    port = free_port()
    t0 = time.time()
    node = launch_node(
        procs,
        0,
        2,
        port,
        "--data_path",
        f"{data}/train",
        "--checkpoint_dir",
        tmp_path / "ckpt",
        *TINY,
        "--join_timeout",
        8,
    )
    rc, out = procs.wait(node, 60)
    seconds = time.time() - t0
    assert error_lines(out) == [
        f"error: only 1 of 2 processes joined within 8 s (master 127.0.0.1:{port}); "
        "check --master_addr, --nnodes, --node_rank and the firewall"
    ], out
    assert rc == 2, out
    assert 8 <= seconds < 60
    assert not os.path.exists(tmp_path / "ckpt")  # nothing written


def tcp_states(port):
    """The states of this host's TCP sockets on local `port`, from /proc (hex: 0A listening, 01 established)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        states += [row[3] for row in rows if int(row[1].rsplit(":", 1)[1], 16) == port]
    return states


def listening(port):
    """Whether a socket on this host listens on TCP `port` (seen without connecting to it)."""
    return "0A" in tcp_states(port)


def hold_back_at_the_door(port, timeout=120):
    """Plays the master for one visitor: takes its check-in and hangs up, so it is retrying when node 0 comes.

    Without this the test hangs on timing: node 0's deadline starts when it listens, and under load a
    second node has taken longer than a short deadline just to start.
    """
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(timeout)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            line = b""
            while not line.endswith(b"\n"):
                data = conn.recv(64)
                assert data, f"the visitor hung up before checking in (said {line!r})"
                line += data
    return line.decode().strip()


def test_every_started_rank_says_how_many_joined(procs):
    # --nnodes 3, nodes 0 and 1 come, node 2 never does: both say 2 of 3, with the master's deadline
    port = free_port()
    visitor = launch_node(procs, 1, 3, port, "--join_timeout", 120)
    assert hold_back_at_the_door(port) == "join 1 3"
    master = launch_node(procs, 0, 3, port, "--join_timeout", 10)
    for rc, out in (procs.wait(p, 90) for p in (master, visitor)):
        assert error_lines(out) == [
            f"error: only 2 of 3 processes joined within 10 s (master 127.0.0.1:{port}); "
            "check --master_addr, --nnodes, --node_rank and the firewall"
        ], out
        assert rc == 2, out


def connections(port):
    """How many established TCP connections this host has on local `port`."""
    return tcp_states(port).count("01")


def test_a_wrong_nnodes_or_a_taken_node_rank_is_told_at_once_and_one_alone_that_the_master_is_unreachable(procs):
    port = free_port()
    master = launch_node(procs, 0, 3, port, "--join_timeout", 300)
    wait_until(lambda: listening(port), 120, f"node 0 to listen on {port}")
    launch_node(procs, 1, 3, port, "--join_timeout", 300)
    wait_until(lambda: connections(port) >= 1, 120, "node 1 to check in")
    # deadlines of 300 s: ending within 120 s is being refused at once
    for rank, nnodes, why in (
        (
            2,
            4,
            "this process counts 4 processes in the job but the master counts 3; "
            "give every node the same --nnodes and --nproc_per_node",
        ),
        (1, 3, "another process has global rank 1 already; give each node its own --node_rank"),
    ):
        rc, out = procs.wait(launch_node(procs, rank, nnodes, port, "--join_timeout", 300, name=f"wrong{nnodes}"), 120)
        assert error_lines(out) == [f"error: the master 127.0.0.1:{port} refused this process: {why}"], out
        assert rc == 2, out
    assert master.poll() is None, "node 0 still waits for a right node 2"

    port = free_port()  # nobody listens: a typo in --master_addr, or node 0 not started
    rc, out = procs.wait(launch_node(procs, 1, 2, port, "--join_timeout", 3, name="alone"), 60)
    assert error_lines(out) == [
        f"error: only 0 of 2 processes joined within 3 s (master 127.0.0.1:{port}, not reachable from this node); "
        "check --master_addr, --nnodes, --node_rank and the firewall"
    ], out
    assert rc == 2, out


def rank_pid(namespace):
    """The training process (not its launcher) inside a node's namespace, or None."""
    for pid in netns.pids_in(namespace):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"TrainUnetDataSet.py" in cmd and cmd[1:2] != [b"-m"]:  # the launcher runs `python3 -m ...`
            return pid
    return None


def wait_until(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def test_a_frozen_node_ends_the_job_and_last_stays_loadable(nodes, procs, tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=40, n_test=1)
    ckpt = tmp_path / "ckpt"
    flags = ["--data_path", f"{data}/train", "--epochs", 50, "--checkpoint_dir", ckpt, *TINY, "--step_timeout", 8]
    runs = [
        procs.start(
            f"node{r}",
            [
                sys.executable,
                "-m",
                LAUNCHER,
                "--nnodes",
                2,
                "--node_rank",
                r,
                "--nproc_per_node",
                1,
                "--master_addr",
                netns.address(0),
                "--master_port",
                MASTER_PORT,
                "TrainUnetDataSet.py",
                *flags,
            ],
            namespace=nodes[r],
        )
        for r in (0, 1)
    ]
    wait_until(lambda: "epoch   1/50" in runs[0].log.read_text(), 120, "epoch 1")
    frozen = rank_pid(nodes[1])
    assert frozen, "node 1's training process"
    os.kill(frozen, signal.SIGSTOP)
    t0 = time.time()
    rc, out = procs.wait(runs[0], 60)
    assert time.time() - t0 < 8 + 20
    lines = error_lines(out)
    assert len(lines) == 1 and lines[0].startswith("error: no progress for 8 s since epoch "), out
    assert f"stopped, continue with --resume {ckpt / 'last'}" in lines[0]
    assert rc == 3, out
    from isbi_unet.checkpoint import load_checkpoint

    assert load_checkpoint(str(ckpt / "last"))["epoch"] >= 1
