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

import os
import signal
import threading

from isbi_unet.errors import Interrupted
from isbi_unet.runtime import INTERRUPTED, exit_now, whoami

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
    Python's own SIGINT handler in place of OneFlow's."""
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
                with self.saving:  # a checkpoint being written is finished first
                    exit_now(self.message(" (stopped at once)"), INTERRUPTED)

    def message(self, how=""):
        """`interrupted at epoch E step S[HOW]; continue with --resume PATH` (or: no checkpoint was saved yet)."""
        epoch, step = self.position
        where = f"continue with --resume {self.resume_from}" if self.resume_from else "no checkpoint was saved yet"
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
