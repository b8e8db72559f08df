"""Ties a rank started by oneflow.distributed.launch to the launcher's life, so a dead rank ends the job,
and gives the job's start-up a deadline, so a node that never joins ends it too.

Measured with OneFlow 0.9.0 on CPU (tests/test_dead_rank.py): when a rank dies the launcher notices
within a second, exits 1, and tries to SIGTERM the other ranks with os.killpg on its own pid. That
kill works only when the launcher leads its process group, as in an interactive shell; started from a
script, a CI job or another program, it fails silently and the other ranks are left behind. Killed
mid-training they abort by themselves (a glog check on the broken socket), but a rank still in
OneFlow's start-up rendezvous (inside `import oneflow`, which waits for every rank) waits forever,
holding its caller's stdout open. With PR_SET_PDEATHSIG the kernel kills a rank when its launcher
exits, whatever the reason.

Across machines that is not enough: a node that never comes (a typo in --master_addr, a wrong
--nnodes or --node_rank, a closed port) left the others waiting inside `import oneflow` forever, silent
(tests/test_multinode.py). So before OneFlow's rendezvous every rank checks in with global rank 0 on
MASTER_ADDR:MASTER_PORT (join(): rank 0 listens on that port until all have joined, then closes it for
OneFlow's own server, which binds it next; OneFlow's clients retry until it does). Rank 0 counts who
came; when not all have within --join_timeout seconds, every started rank prints one line,
`error: only K of N processes joined within S s (master ADDR:PORT); check ...`, and exits 2, before
anything is written. OneFlow's own start-up then runs under a deadline of the same length.
"""

import ctypes
import math
import os
import select
import signal
import socket
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
JOIN_TIMEOUT = 600.0  # seconds; TrainUnetDataSet's --join_timeout default
HINT = "check --master_addr, --nnodes, --node_rank and the firewall"


def under_launcher():
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE") or 1) > 1


def tie_to_launcher(argv=None):
    """Call before importing oneflow, whose import blocks until all ranks have joined; no-op in a plain run.

    Under the launcher: the launcher's death kills this rank; then every rank must join within
    --join_timeout (read from argv, default sys.argv) and oneflow is imported under the same deadline.
    """
    if not under_launcher() or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    # prctl failing is not fatal: the job is then only as robust as OneFlow's launcher makes it.
    tied = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    if tied and os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)
    if "oneflow" in sys.modules:  # imported already: its rendezvous is over
        return
    timeout = join_timeout(sys.argv[1:] if argv is None else argv)
    world = int(os.environ["WORLD_SIZE"])
    master = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
    join(master, int(os.environ.get("RANK", "0")), world, timeout)
    stalled = threading.Timer(
        timeout,
        fail,
        [
            f"all {world} processes joined the master {master[0]}:{master[1]}, but OneFlow's start-up did not "
            f"finish within {timeout:g} s; the nodes must reach each other on every TCP port (OneFlow picks its "
            "ports at random): check the firewall"
        ],
    )
    stalled.daemon = True
    stalled.start()
    import oneflow  # noqa: F401  (its rendezvous, now under the deadline)

    stalled.cancel()


def join_timeout(argv):
    """--join_timeout (or --join-timeout) from argv, the last one given; JOIN_TIMEOUT when absent."""
    value = None
    for i, arg in enumerate(argv):
        for flag in ("--join_timeout", "--join-timeout"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    if value is None:
        return JOIN_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        fail(f"--join_timeout must be positive, got {value}")
    return seconds


def fail(message):
    """One `error: ...` line and exit 2, from any thread (the main one may be inside OneFlow's C++)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def joined_message(count, world, timeout, master, reachable=True):
    where = f"{master[0]}:{master[1]}" + ("" if reachable else ", not reachable from this node")
    return f"only {count} of {world} processes joined within {timeout:g} s (master {where}); {HINT}"


def join(master, rank, world, timeout):
    """Returns once all `world` ranks have checked in with rank 0 at `master`; exits 2 at the deadline."""
    deadline = time.monotonic() + timeout
    if rank == 0:
        host(master, world, timeout, deadline)
    else:
        visit(master, rank, world, timeout, deadline)


def listen(port):
    """A listening socket on every address (IPv6 and IPv4 when the kernel has IPv6), like OneFlow's server."""
    for family in (socket.AF_INET6, socket.AF_INET):
        try:
            server = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            server.bind(("", port))
            server.listen(64)
            return server
        except OSError as e:
            server.close()
            error = e
    fail(f"--master_port {port} cannot be used on this node ({error.strerror}); choose another free port")


def send(conn, line):
    try:
        conn.sendall(f"{line}\n".encode())
    except OSError:
        pass


def host(master, world, timeout, deadline):
    """Rank 0: counts the ranks that check in (`join RANK WORLD`) and tells them `count K`, then `go`."""
    server = listen(master[1])
    peers = {}  # rank -> socket
    buffers = {}  # socket -> bytes received so far, until its join line
    try:
        while len(peers) < world - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for conn in peers.values():  # with the master's deadline, which is the one that passed
                    send(conn, f"fail {len(peers) + 1} {timeout:g}")
                fail(joined_message(len(peers) + 1, world, timeout, master))
            readable, _, _ = select.select([server, *buffers, *peers.values()], [], [], min(remaining, 1.0))
            for conn in readable:
                if conn is server:
                    new, _ = server.accept()
                    buffers[new] = b""
                    continue
                try:
                    data = conn.recv(256)
                except OSError:
                    data = b""
                if conn in peers.values():  # a joined rank that closed: it died; count it out
                    if not data:
                        del peers[next(r for r, c in peers.items() if c is conn)]
                        conn.close()
                        for other in peers.values():
                            send(other, f"count {len(peers) + 1}")
                    continue
                buffers[conn] += data
                if data and b"\n" not in buffers[conn] and len(buffers[conn]) < 256:
                    continue
                line = buffers.pop(conn).decode(errors="replace").split()
                refusal = check_join(line, world, peers)
                if refusal:
                    send(conn, f"refuse {refusal}")
                    conn.close()
                    continue
                peers[int(line[1])] = conn
                for other in peers.values():
                    send(other, f"count {len(peers) + 1}")
        for conn in peers.values():
            send(conn, "go")
        for conn in peers.values():  # let them close first, so no TIME_WAIT holds the port OneFlow binds next
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                conn.recv(1)
            except OSError:
                pass
            conn.close()
    finally:
        for conn in buffers:
            conn.close()
        server.close()


def check_join(line, world, peers):
    """Why a check-in is refused (None when it is accepted)."""
    if len(line) != 3 or line[0] != "join" or not line[1].isdigit() or not line[2].isdigit():
        return f"not a process of this job (said {' '.join(line)[:40]!r}); is --master_port used by another program?"
    rank, theirs = int(line[1]), int(line[2])
    if theirs != world:
        return (
            f"this process counts {theirs} processes in the job but the master counts {world}; "
            "give every node the same --nnodes and --nproc_per_node"
        )
    if rank in peers or not 0 < rank < world:
        return f"another process has global rank {rank} already; give each node its own --node_rank"
    return None


def visit(master, rank, world, timeout, deadline):
    """Any other rank: checks in with rank 0 (retrying until it answers) and waits for `go`."""
    count = None  # what the master last said; None while it has not answered
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fail(joined_message(count or 0, world, timeout, master, reachable=count is not None))
        try:
            conn = socket.create_connection(master, timeout=min(remaining, 2.0))
        except OSError:
            time.sleep(min(0.5, max(remaining, 0)))
            continue
        with conn:
            send(conn, f"join {rank} {world}")
            pending = b""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    fail(joined_message(count or 0, world, timeout, master, reachable=count is not None))
                conn.settimeout(min(remaining, 1.0))
                try:
                    data = conn.recv(256)
                except socket.timeout:
                    continue
                except OSError:
                    data = b""
                if not data:
                    break  # the master went away (killed, or restarted): check in again
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    word, _, rest = line.decode(errors="replace").partition(" ")
                    if word == "count":
                        count = int(rest)
                    elif word == "go":
                        return
                    elif word == "fail":
                        joined, _, theirs = rest.partition(" ")
                        fail(joined_message(int(joined), world, float(theirs or timeout), master))
                    elif word == "refuse":
                        fail(f"the master {master[0]}:{master[1]} refused this process: {rest}")
        time.sleep(0.5)
