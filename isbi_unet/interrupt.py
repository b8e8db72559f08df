"""Ctrl-C (SIGINT) and SIGTERM stop a training run between steps, with one line and exit code 130.

    python3 TrainUnetDataSet.py ...        # Ctrl-C: `error: interrupted at epoch E step S; continue with
                                           #   --resume DIR/last`, exit 130; Ctrl-C again: stop now, the same
                                           #   line with `step S (stopped at once)`
    python3 -m isbi_unet.launch --nproc_per_node 2 TrainUnetDataSet.py ...   # the same, all ranks at one step

Measured with OneFlow 0.9.0 on CPU: `import oneflow` installs its own C handler for SIGINT
(oneflow::AbortSignalHandler), and a Ctrl-C mid-step then ends the process with a segmentation fault
(exit 139) or exit 255. `StopSignals` replaces it for SIGINT and SIGTERM with a handler that only counts:
the training loop calls `check` between steps, and once any rank has seen a signal every rank raises
`errors.Interrupted` at the same step (an all_reduce of the flag; no rank is left waiting in a collective).

A Python signal handler runs only when the main thread is back in Python, which during a step is when
the step ends (measured: 2.1 s after the signal in a 3.1 s CPU-recipe step). So signals are also
counted the moment they arrive, by a thread reading `signal.set_wakeup_fd`'s pipe: a second signal ends
the process at once (a width-64 step on CPU takes about a minute), except inside `protected()` (a
checkpoint being written), which finishes first, so nothing is left half-written.

Before that, from a script's first line until StopSignals takes over (`guard_start_up`): a signal ends the
process with `error: interrupted during start-up; nothing was written` and exit 130. Measured without it:
Ctrl-C inside `import oneflow` (about 1 s, or as long as the launcher's rendezvous waits for other nodes)
ended the process silently with exit 255 (export_onnx.py hung), and before and early in that import, or while
node 0 waited for the other nodes, with a KeyboardInterrupt traceback.
"""

import os
import signal
import sys
import threading

from isbi_unet.errors import Interrupted, rank

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_start_up = None  # (thread, done) while guard_start_up holds the signals


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
            if rank() == 0:
                print("error: interrupted during start-up; nothing was written", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)  # the main thread may be inside OneFlow's import, which this thread cannot unwind


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
    """For a script without a training loop: Ctrl-C raises KeyboardInterrupt (run_main: one line, exit 130).

    Python's own SIGINT handler, in place of OneFlow's, which ends the process with a segmentation fault.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    end_start_up_guard()


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
                with self.saving:
                    self.exit_now()

    def exit_now(self):
        if rank() == 0:
            print(f"error: {self.message(' (stopped at once)')}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit: the main thread may be inside a OneFlow kernel, and this thread cannot unwind it.
        os._exit(130)

    def message(self, how=""):
        """`interrupted at epoch E step S[HOW]; continue with --resume PATH` (or: no checkpoint was saved yet)."""
        epoch, step = self.position
        where = f"continue with --resume {self.resume_from}" if self.resume_from else "no checkpoint was saved yet"
        return f"interrupted at epoch {epoch} step {step}{how}; {where}"

    def requested(self):
        """True on every rank once any rank has seen a signal (a collective under the launcher)."""
        import oneflow as flow

        if flow.env.get_world_size() == 1:
            return self.count > 0
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
