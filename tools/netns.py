"""Simulated machines on one Linux host: one network namespace per node, each with its own address.

    sudo python3 tools/netns.py up --nodes 2            # namespaces isbi-n0, isbi-n1: 10.200.0.1, 10.200.0.2
    sudo ip netns exec isbi-n0 bash train.sh ...         # a command "on node 0"
    sudo python3 tools/netns.py down                    # removes them (and every process still inside)

Each node namespace gets a veth whose other end sits on a bridge inside a hub namespace (PREFIX-hub), so
the nodes reach each other and nothing else: nothing is added to the host's own network namespace, no
route leads out, and removing the namespaces removes every link. Needs root (CAP_SYS_ADMIN) and `ip`
from iproute2. Used by tests/test_multinode.py; docs/several_machines.md shows it as a rehearsal for real
machines.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys

PREFIX = "isbi"
SUBNET = "10.200.0"  # node i gets SUBNET.(i + 1)/24


def ip(*args):
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip() or 'failed'}")
    return proc.stdout


def node_name(prefix, i):
    return f"{prefix}-n{i}"


def address(i, subnet=SUBNET):
    return f"{subnet}.{i + 1}"


def unavailable():
    """Why namespaces cannot be made here (None when they can): not Linux, no `ip`, not root."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


def up(nodes, prefix=PREFIX, subnet=SUBNET):
    """Creates PREFIX-hub (a bridge) and PREFIX-n0 ... with addresses SUBNET.1 ...; returns the node names.

    On any failure removes what it made and raises OSError.
    """
    hub = f"{prefix}-hub"
    try:
        ip("netns", "add", hub)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "link", "set", "br0", "up")
        names = []
        for i in range(nodes):
            name = node_name(prefix, i)
            ip("netns", "add", name)
            names.append(name)
            ip("-n", hub, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("-n", hub, "link", "set", f"n{i}", "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{address(i, subnet)}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
        return names
    except OSError:
        down(prefix)
        raise


def namespaces(prefix=PREFIX):
    """The namespaces named PREFIX-hub and PREFIX-nI that exist now."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    ours = [f"{prefix}-hub"]
    return [n for n in names if n in ours or (n.startswith(f"{prefix}-n") and n[len(prefix) + 2 :].isdigit())]


def pids_in(name):
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()]


def down(prefix=PREFIX):
    """Kills every process inside PREFIX's namespaces, then deletes them (their links go with them)."""
    for name in namespaces(prefix):
        for pid in pids_in(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--nodes", type=int, default=2, help="number of node namespaces (up)")
    p.add_argument("--prefix", default=PREFIX, help="namespace names: PREFIX-hub, PREFIX-n0, PREFIX-n1, ...")
    p.add_argument("--subnet", default=SUBNET, help="first three octets; node i gets SUBNET.(i+1)")
    args = p.parse_args(argv)
    why = unavailable()
    if why:
        sys.exit(f"error: {why}")
    if args.action == "down":
        down(args.prefix)
        return
    try:
        names = up(args.nodes, args.prefix, args.subnet)
    except OSError as e:
        sys.exit(f"error: {e}")
    for i, name in enumerate(names):
        print(f"node {i}: namespace {name}, address {address(i, args.subnet)}  (ip netns exec {name} COMMAND)")


if __name__ == "__main__":
    main()
