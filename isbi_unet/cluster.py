"""Blocks predicted on a Dask distributed cluster: `predict_unet_test.py --scheduler tcp://HOST:8786`.

    executor = DaskExecutor("tcp://10.0.0.1:8786", timeout=30)   # connects (bounded), waits for a worker (bounded)
    future = executor.submit(forward_window, spec, window, core)  # a block, as a Dask future
    finished = executor.done(futures)                             # at least one, as they finish
    executor.close()

The engine (isbi_unet/volume.py) is the same as for one machine: it reads and standardises each block's window
here and writes the results here; the cluster only runs the forward pass, so the output is bit-identical to one
process. Each worker process loads the model once (predictor.worker_predictor, a per-process cache keyed by the
picklable Spec), from the Spec's absolute path: every worker machine needs the model at that path (a shared file
system, or a copy) and this repository's code and venv (docs/volumes.md). Dask's scheduler redoes the blocks of a
worker that is lost (killed, out of memory, its machine gone); a block whose workers die more than
distributed.scheduler.allowed-failures times (3) ends the run with one line, as does a cluster that has had no
worker for `timeout` seconds. Needs dask and distributed (requirements-volumes.txt, CPython 3.10+).
"""

import asyncio
import re
import time

from isbi_unet.errors import DataError

INSTALL = "pip install -r requirements-volumes.txt (CPython 3.10+), or `source setup.sh`"
ADDRESS = re.compile(r"^([a-z]+://)?[^\s/:]+:\d+$")  # tcp://HOST:PORT (or HOST:PORT, or tls://...)
# What a refused, unreachable or silent address raises (asyncio's TimeoutError is not the builtin one before 3.11)
NO_ANSWER = (OSError, TimeoutError, asyncio.TimeoutError)
POLL = 1.0  # seconds between looks at a cluster that has no workers
CONTINUE = "the finished blocks are kept: run the same command again to continue"


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise DataError(f"--scheduler needs dask and distributed, which are not installed: {INSTALL}") from None
    return distributed


def connect(address, timeout):
    """A Client of the scheduler at `address`, with at least one worker; each wait bounded by `timeout` s."""
    distributed = import_distributed()
    if not ADDRESS.match(address):
        raise DataError(f"{address}: --scheduler takes a Dask scheduler's address, tcp://HOST:PORT")
    client = distributed.Client.__new__(distributed.Client)  # held, so that a failed one can be let go quietly
    try:
        client.__init__(address, timeout=timeout, set_as_default=False)
    except NO_ANSWER as e:
        forget(client)
        raise DataError(f"{address}: no Dask scheduler answered within {timeout:g} s ({first_line(e)})") from None
    except Exception as e:  # something else listens there (measured: an HTTP server's reply read as a frame size
        # made distributed ask for 3 EiB, a MemoryError)
        forget(client)
        raise DataError(
            f"{address}: what answered is not a Dask scheduler ({type(e).__name__}: {first_line(e)})"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except NO_ANSWER:
        client.close()
        raise DataError(
            f"{address}: the Dask scheduler has no workers (waited {timeout:g} s); start them with "
            f"`dask worker {address}` (docs/volumes.md)"
        ) from None
    return client


def forget(client):
    """Lets a client that never connected go without a word: its __del__ would otherwise try to close the
    connection it never had and print a TimeoutError traceback at exit."""
    client.status = "closed"


def first_line(error):
    """An error's first sentence (distributed's run on over several lines), or its type's name."""
    text = " ".join(str(error).split())
    return re.split(r"(?<=\.) ", text)[0].rstrip(".") if text else type(error).__name__


def worker_threads(client):
    """Task slots in the cluster now: the engine keeps twice as many windows in flight."""
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))


def on_worker(fn, *args):
    """Runs fn(*args) on a Dask worker; a DataError (a model this machine cannot load) names the worker."""
    try:
        return fn(*args)
    except DataError as e:
        from distributed import get_worker

        raise DataError(f"Dask worker {get_worker().address}: {e}") from None


class DaskExecutor:
    """The executor interface of isbi_unet/volume.py over a Dask cluster."""

    def __init__(self, address, timeout):
        self.address, self.timeout = address, timeout
        self.distributed = import_distributed()
        self.client = connect(address, timeout)
        self.workers = worker_threads(self.client)

    def submit(self, fn, *args):
        # pure=False: every block is its own task (a window is never worth hashing to find an equal one)
        return self.client.submit(on_worker, fn, *args, pure=False)

    def done(self, futures):
        """The finished ones among `futures` (at least one); a failed block or a cluster left without workers for
        `timeout` s is one DataError."""
        alone_since = None
        while True:
            finished = self.wait_for_one(futures)
            if finished:
                for future in finished:
                    self.check(future)
                return list(finished)
            if self.client.status != "running":
                raise DataError(f"{self.address}: lost the Dask scheduler; {CONTINUE}")
            if self.client.scheduler_info()["workers"]:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > self.timeout:
                raise DataError(f"{self.address}: no Dask worker left for {self.timeout:g} s; {CONTINUE}")

    def wait_for_one(self, futures):
        """The futures finished within POLL seconds (none: an empty set, where wait() raises)."""
        try:
            with self.client.as_current():  # wait() asks for the current client
                return self.distributed.wait(futures, timeout=POLL, return_when="FIRST_COMPLETED").done
        except NO_ANSWER:
            return set()

    def check(self, future):
        """A failed block as one DataError: the worker's own (a model it cannot load), or what Dask says."""
        if future.status != "error":
            return
        error = future.exception()
        if isinstance(error, DataError):
            raise error
        if isinstance(error, self.distributed.KilledWorker):
            raise DataError(
                f"{self.address}: a block's Dask workers died {error.allowed_failures + 1} times (killed, or out of "
                f"memory: try a smaller --max_memory); {CONTINUE}"
            )
        if isinstance(error, ImportError) or "deserializ" in str(error):  # the code was not found there
            raise DataError(
                f"{self.address}: the Dask cluster cannot load this repository's code ({first_line(error)}); the "
                "scheduler and every worker need it on their PYTHONPATH (docs/volumes.md)"
            )
        raise DataError(f"{self.address}: a Dask worker failed: {type(error).__name__}: {first_line(error)}")

    def restart(self):
        pass  # Dask redoes a lost worker's blocks itself

    def close(self):
        """Leaves the cluster: the scheduler drops the blocks still queued (a stopped run does not wait for them)."""
        self.client.close(timeout=self.timeout)
