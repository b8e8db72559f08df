"""Who this process is in a data-parallel job, how it exits, and how it joins the job: the plumbing every script
shares, framework-free and without side effects at import.

`whoami()` reads rank, local rank, world size and master from the launcher's environment, so it is right before
and after `import oneflow` (which sets RANK=-1 outside the launcher). `join_job()` runs before that import, whose
start-up rendezvous OneFlow 0.9.0 lets wait forever (measured: ONEFLOW_TIMEOUT_SECONDS does not bound it, and
the library reads no other rendezvous setting), so a node that never comes left the others waiting, silent.
Each process first checks in with global rank 0 on MASTER_ADDR:MASTER_PORT, which then frees the port for
OneFlow's own server (OneFlow's clients retry until it binds); at --join_timeout every started process says how
many came and exits 2, before anything is written. PR_SET_PDEATHSIG kills a process when its launcher exits:
OneFlow's launcher stops the others of a failed rank with os.killpg on its own pid, which fails silently unless
it leads its process group (tests/test_dead_rank.py).
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
from typing import NamedTuple, Tuple

BAD_INPUT = 2  # flags, data or files refused; also a job whose processes did not all join
STALLED = 3  # no training step began within --step_timeout seconds
INTERRUPTED = 130  # Ctrl-C, or SIGTERM to a training run, as a shell reports SIGINT
TERMINATED = 143  # SIGTERM to any other script, as a shell reports it
HINT = "check --master_addr, --nnodes, --node_rank and the firewall"
JOIN_TIMEOUT = 600.0  # --join_timeout's default, read here before OneFlow starts
LAST_OUT = 1.0  # seconds rank 0 lets the other ranks of a failed job exit before it does


class BadInput(ValueError):
    """Refused input (flags, data, files): one line and exit 2. isbi_unet.errors.DataError is the kind raised."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; the message says where and how to continue. Exit 130."""


class Terminated(Exception):
    """SIGTERM stopped a script without a training loop, unwinding it (temporary files go). Exit 143."""


class Process(NamedTuple):
    rank: int  # global rank, 0 in a plain run
    local_rank: int  # rank on this node, which picks its GPU
    world: int  # processes in the job
    master: Tuple[str, int]  # global rank 0's address and port

    @property
    def address(self):
        return f"{self.master[0]}:{self.master[1]}"


def whoami():
    env = os.environ
    return Process(
        rank=max(0, int(env.get("RANK") or 0)),
        local_rank=int(env.get("LOCAL_RANK") or 0),
        world=int(env.get("WORLD_SIZE") or 1),
        master=(env.get("MASTER_ADDR") or "127.0.0.1", int(env.get("MASTER_PORT") or 29500)),
    )


def exit_now(message, code, every_rank=False):
    """`error: MESSAGE` (from rank 0, or from every rank) and exit `code` at once, from any thread: the main one
    may be inside OneFlow's C++, which no exception unwinds."""
    if every_rank or whoami().rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def fail(message, code):
    """`message` on stderr (rank 0 only), then exit `code`."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # already stopping: a late Ctrl-C must not end in a traceback
    me = whoami()
    if me.rank == 0:
        print(message, file=sys.stderr, flush=True)
    if me.world > 1:
        sys.stdout.flush()
        if me.rank == 0:  # the others, failing alike, go first: OneFlow aborts a rank that finds rank 0 gone,
            time.sleep(LAST_OUT)  # printing a 10-line stack trace (3 of 6 runs under load without this pause)
        # OneFlow's exit waits at a barrier for every rank (measured: forever when one rank fails alone).
        os._exit(code)
    sys.exit(code)


def join_timeout(argv=None):
    """--join_timeout (or --join-timeout) from the command line, read before OneFlow starts; the script's own
    parser declares and checks the flag (a value that is no number is left to it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    value = JOIN_TIMEOUT
    for i, arg in enumerate(argv):
        name, eq, text = arg.partition("=")
        if name in ("--join_timeout", "--join-timeout"):
            try:
                value = float(text if eq else argv[i + 1])
            except (IndexError, ValueError):
                pass
    return value


def join_job(timeout):
    """Call before `import oneflow`; a no-op in a plain run. Ties this process to its launcher, waits until every
    process has checked in with rank 0 (exit 2 after `timeout` s), then imports oneflow under the same deadline."""
    me = whoami()
    if "LOCAL_RANK" not in os.environ or me.world == 1 or not sys.platform.startswith("linux"):
        return
    tie_to_launcher()
    if "oneflow" in sys.modules:  # imported already: its rendezvous is over
        return
    if not timeout > 0 or math.isinf(timeout):  # `not >` also refuses NaN
        exit_now(f"--join_timeout must be positive, got {timeout}", BAD_INPUT)
    deadline = time.monotonic() + timeout
    if me.rank == 0:
        host(me, timeout, deadline)
    else:
        visit(me, timeout, deadline)
    late = (
        f"all {me.world} processes joined the master {me.address}, but OneFlow's start-up did not finish within "
        f"{timeout:g} s; the nodes must reach each other on every TCP port (OneFlow picks its ports at random): "
        "check the firewall"
    )
    stalled = threading.Timer(timeout, exit_now, [late, BAD_INPUT, True])
    stalled.daemon = True
    stalled.start()
    import oneflow  # noqa: F401  (its rendezvous, now under the deadline)

    stalled.cancel()


def tie_to_launcher():
    """The launcher's death, whatever its cause, kills this process (SIGKILL from the kernel)."""
    launcher = os.getppid()
    # prctl failing is not fatal: the job is then only as robust as OneFlow's launcher makes it.
    tied = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0  # 1: PR_SET_PDEATHSIG
    if tied and os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)


def not_joined(count, me, timeout, reachable=True):
    where = me.address + ("" if reachable else ", not reachable from this node")
    message = f"only {count} of {me.world} processes joined within {timeout:g} s (master {where}); {HINT}"
    exit_now(message, BAD_INPUT, every_rank=True)


def send(conn, line):
    try:
        conn.sendall(f"{line}\n".encode())
    except OSError:
        pass


def listen(port):
    """A listening socket on every address (IPv6 and IPv4 where the kernel has IPv6), as OneFlow's server."""
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, backlog=64, dualstack_ipv6=True)
        return socket.create_server(("", port), backlog=64)
    except OSError as e:
        reason = f"--master_port {port} cannot be used on this node ({os.strerror(e.errno)})"
        exit_now(f"{reason}; choose another free port", BAD_INPUT)


def host(me, timeout, deadline):
    """Rank 0: admits the processes that check in (`join RANK WORLD`), tells them `count K` as it changes, then
    `go`; at the deadline `fail K TIMEOUT`, so each names the master's count and deadline."""
    peers = {}  # rank -> connection
    with listen(me.master[1]) as server:
        while len(peers) < me.world - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for conn in peers.values():
                    send(conn, f"fail {len(peers) + 1} {timeout:g}")
                not_joined(len(peers) + 1, me, timeout)
            ready, _, _ = select.select([server, *peers.values()], [], [], min(remaining, 1.0))
            for conn in ready:
                if conn is server:
                    admit(server.accept()[0], me.world, peers)
                else:  # a joined process sends nothing more: readable means it closed, it died; count it out
                    peers = {rank: c for rank, c in peers.items() if c is not conn}
                    conn.close()
                for other in peers.values():
                    send(other, f"count {len(peers) + 1}")
        for conn in peers.values():
            send(conn, "go")
        for conn in peers.values():  # they close first, so no TIME_WAIT holds the port OneFlow binds next
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                conn.recv(1)
            except OSError:
                pass
            conn.close()


def admit(conn, world, peers):
    """Reads a newcomer's check-in line and adds it to `peers`, or tells it why not and hangs up."""
    conn.settimeout(2.0)  # a process of this job says its line at once
    try:
        words = conn.makefile(encoding="utf-8", errors="replace").readline(256).split()
    except (OSError, ValueError):
        words = []
    refusal = refuse(words, world, peers)
    if refusal:
        send(conn, f"refuse {refusal}")
        conn.close()
    else:
        peers[int(words[1])] = conn


def refuse(words, world, peers):
    """Why a check-in is refused (None when it is accepted)."""
    if len(words) != 3 or words[0] != "join" or not words[1].isdigit() or not words[2].isdigit():
        return f"not a process of this job (said {' '.join(words)[:40]!r}); is --master_port used by another program?"
    rank, theirs = int(words[1]), int(words[2])
    if theirs != world:
        return (
            f"this process counts {theirs} processes in the job but the master counts {world}; "
            "give every node the same --nnodes and --nproc_per_node"
        )
    if rank in peers or not 0 < rank < world:
        return f"another process has global rank {rank} already; give each node its own --node_rank"
    return None


def visit(me, timeout, deadline):
    """Any other rank: checks in with rank 0 (again whenever the connection drops) until it says `go`."""
    count = None  # what the master last said; None while it has not answered
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(me.master, timeout=min(deadline - time.monotonic(), 2.0)) as conn:
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                send(conn, f"join {me.rank} {me.world}")
                for line in conn.makefile(encoding="utf-8", errors="replace"):
                    word, _, rest = line.strip().partition(" ")
                    if word == "go":
                        return
                    if word == "count":
                        count = int(rest)
                    elif word == "fail":
                        joined, _, theirs = rest.partition(" ")
                        not_joined(int(joined), me, float(theirs))
                    elif word == "refuse":
                        exit_now(f"the master {me.address} refused this process: {rest}", BAD_INPUT, True)
                    conn.settimeout(max(deadline - time.monotonic(), 0.01))
        except (OSError, ValueError):  # not reachable, the master went away, or the deadline passed while waiting
            pass
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    not_joined(count or 0, me, timeout, reachable=count is not None)
