"""Ctrl-C (SIGINT) and SIGTERM stop a run with one line and exit code 130: training between steps, every rank at
the same step; during start-up at once, with nothing written.

OneFlow 0.9.0's `import oneflow` installs its own SIGINT handler, and a Ctrl-C mid-step then ended the process
with a segmentation fault (exit 139) or exit 255; inside the import, silently with exit 255 or a hang. So:

- `guard_start_up()`, a script's first call: the signals are blocked and taken by a thread of ours, which prints
  `error: interrupted during start-up; nothing was written` and exits, until a handler of the script takes over.
- `StopSignals`, around the training loop: a signal only counts. `check()` between steps raises
  `errors.Interrupted` on every rank once any rank has seen one (an all_reduce of the flag, so no rank is left
  in a collective). A Python handler runs only once a step ends (measured: 2.1 s late in a 3.1 s step), so a
  thread reads `signal.set_wakeup_fd`'s pipe: a second signal ends the process at once, except inside
  `protected()` (a checkpoint being written), which finishes first.
"""

import contextlib
import os
import signal
import threading

from isbi_unet.process.runtime import (
    BAD_INPUT,
    INTERRUPTED,
    TERMINATED,
    BadInput,
    Interrupted,
    Terminated,
    exit_now,
    fail,
    join_job,
    join_timeout,
    whoami,
)
from isbi_unet.process.watchdog import arm, armed, disarm, feed

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOT_SAVED = "no checkpoint was saved yet; the same command starts the run again"
_start_up = None  # (thread, done) while guard_start_up holds the signals


def start_up(join=False):
    """A script's first call, before its heavy imports: guard_start_up(), and with `join` (a training script that
    may run under the launcher) join_job() under the command line's --join_timeout."""
    guard_start_up()
    if join:
        join_job(join_timeout())


def guard_start_up():
    """Until end_start_up_guard: SIGINT / SIGTERM end the process with one line and exit 130.

    The signals are blocked in this thread, and so in every thread OneFlow's import starts (a thread inherits
    its creator's mask), and taken by a thread of ours with sigtimedwait: no handler, OneFlow's or Python's,
    ever runs for them meanwhile.
    """
    global _start_up
    if _start_up is not None or not hasattr(signal, "sigtimedwait"):  # sigtimedwait: Linux, not macOS
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    done = threading.Event()
    thread = threading.Thread(target=_stop_at_start_up, args=(done,), name="start-up-signals", daemon=True)
    thread.start()
    _start_up = (thread, done)


def _stop_at_start_up(done):
    while not done.is_set():
        if signal.sigtimedwait(SIGNALS, 0.05) is not None:
            exit_now("interrupted during start-up; nothing was written", INTERRUPTED)


def end_start_up_guard():
    """Hands SIGINT / SIGTERM to the handlers installed now; one that came meanwhile reaches them then."""
    global _start_up
    if _start_up is None:
        return
    thread, done = _start_up
    done.set()
    thread.join()
    _start_up = None
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a pending signal is delivered here, to this thread


def keyboard_interrupts():
    """For a script without a training loop: Ctrl-C raises KeyboardInterrupt (run_main: one line, exit 130),
    Python's own SIGINT handler in place of OneFlow's, and SIGTERM raises Terminated (one line, exit 143), so
    that both unwind the script and its temporary files go."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    end_start_up_guard()


def _terminate(signum, frame):
    raise Terminated()


def worker_signals():
    """A pool worker's initializer: Ctrl-C reaches the whole group and the parent ends the pool, so a worker
    ignores it; SIGTERM ends a worker even when the parent was started with it ignored (nohup, `&` in some
    shells): ignored, a worker blocked on a full result pipe keeps Pool.terminate waiting forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_main(main, session=False):
    """Every script's way to run main(): refused input (a DataError) becomes one `error: ...` line and exit 2,
    Interrupted or Ctrl-C exit 130, SIGTERM exit 143, an OSError no check foresaw one line and exit 2; never a
    traceback, and only rank 0 prints. Ctrl-C and SIGTERM raise from the start of main(), unless `session`:
    main() then opens session(), which takes them over from the start-up guard."""
    if not session:
        keyboard_interrupts()
    try:
        main()
    except BadInput as e:
        fail(f"error: {e}", BAD_INPUT)
    except Interrupted as e:
        fail(f"error: {e}", INTERRUPTED)
    except KeyboardInterrupt:  # Ctrl-C in a script that has no step to finish
        fail("error: interrupted", INTERRUPTED)
    except Terminated:
        fail("error: terminated (SIGTERM)", TERMINATED)
    except OSError as e:  # a file system refusal no check foresaw (permissions, disk full): still one line
        fail(f"error: {e.filename or 'a file'}: {e.strerror or e}", BAD_INPUT)
    # Done: a Ctrl-C from now on changes nothing, and Python's shutdown restores SIGINT's default, under which
    # it would end the finished process by signal (exit -2) instead of 0.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def signals_held():
    """`with signals_held():` code that swallows exceptions (a bare `except:`, as in OneFlow's ONNX converter) runs
    whole; a Ctrl-C or SIGTERM meanwhile is held and honoured when it returns, by KeyboardInterrupt or
    Terminated (run_main: exit 130 or 143), before anything after it is written."""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:  # replaces any exception of the block: the user asked to stop
            raise KeyboardInterrupt() if held[0] == signal.SIGINT else Terminated()


class StopSignals:
    """Context manager: SIGINT and SIGTERM request a stop instead of ending the process.

    `position` (epoch, steps done in it) and `resume_from` (the last saved checkpoint or None) make the
    message; the caller keeps them current.
    """

    def __init__(self, device="cpu", position=(1, 0)):
        self.device, self.position, self.resume_from = device, position, None
        self.count = 0  # signals seen by this process
        self.saving = threading.Lock()  # held while a checkpoint is written; a forced stop waits for it

    def __enter__(self):
        self.previous = {s: signal.signal(s, lambda signum, frame: None) for s in SIGNALS}
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # set_wakeup_fd's requirement: a signal must never block
        self.pipe = (read_end, write_end)
        self.previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        threading.Thread(target=self.watch, name="stop-signals", daemon=True).start()
        end_start_up_guard()
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous_fd)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        os.close(self.pipe[1])  # the watcher reads end-of-file and returns

    def watch(self):
        while True:
            data = os.read(self.pipe[0], 64)
            if not data:
                os.close(self.pipe[0])
                return
            self.count += sum(byte in SIGNALS for byte in data)  # the pipe also carries e.g. SIGCHLD
            if self.count >= 2:
                with self.saving:  # a checkpoint being written is finished first
                    exit_now(self.message(" (stopped at once)"), INTERRUPTED)

    def message(self, how=""):
        """`interrupted at epoch E step S[HOW]; continue with --resume PATH` (or NOT_SAVED)."""
        epoch, step = self.position
        where = f"continue with --resume {self.resume_from}" if self.resume_from else NOT_SAVED
        return f"interrupted at epoch {epoch} step {step}{how}; {where}"

    def requested(self):
        """True on every rank once any rank has seen a signal (a collective under the launcher)."""
        if whoami().world == 1:
            return self.count > 0
        import oneflow as flow

        flag = flow.tensor([float(self.count > 0)], device=self.device)
        flow.comm.all_reduce(flag)
        return flag.item() > 0

    def check(self, epoch=None, step=None):
        """Records where training is (if given), then raises Interrupted when a stop was requested."""
        if epoch is not None:
            self.position = (epoch, step)
        if self.requested():
            raise Interrupted(self.message())

    def protected(self):
        """`with stop.protected():` a second signal waits until the block is done."""
        return self.saving


class Session:
    """What a training loop is handed by session(): one `tick(epoch, step)`, and the checkpoint to resume from."""

    def __init__(self, stop, step_timeout):
        self.stop, self.step_timeout = stop, step_timeout

    def tick(self, epoch, step):
        """Call as each epoch begins (step 0) and after each step. Feeds the stall watchdog (armed at the first
        tick under the launcher), and raises Interrupted on every rank at the same step once any rank saw Ctrl-C
        or SIGTERM."""
        if self.step_timeout and whoami().world > 1 and not armed():
            arm(self.step_timeout, lambda: self.stop.resume_from)
        feed(epoch, step)
        if step == 0 and self.stop.position[1] > 0:  # a new epoch: the stop names the last step done, now saved
            self.stop.check()
        else:
            self.stop.check(epoch, step)

    def saved(self, path):
        """`path` (a checkpoint) is now what a stopped run continues from; every rank calls it."""
        self.stop.resume_from = path

    def saving(self):
        """`with s.saving():` a second Ctrl-C waits until the checkpoint being written is complete."""
        return self.stop.protected()

    def stop_requested(self):
        """Whether any rank has seen Ctrl-C or SIGTERM (a collective under the launcher)."""
        return self.stop.requested()


@contextlib.contextmanager
def session(device="cpu", step_timeout=None):
    """`with session(device, step_timeout) as s:` the training run's process life: Ctrl-C and SIGTERM stop it at
    the next s.tick() (a second one at once, but after a checkpoint being written), and under the launcher a
    job in which no step begins for `step_timeout` s ends with exit 3 (isbi_unet/process/watchdog.py)."""
    with StopSignals(device) as stop:
        try:
            yield Session(stop, step_timeout)
        finally:
            disarm()
