"""Process life behind one door, for every script; it imports nothing else of the repo.

    from isbi_unet.process import start_up
    if __name__ == "__main__":
        start_up()          # before the heavy imports: Ctrl-C there is one line, exit 130 (join=True: the job's)
    ...
    run_main(main)          # one `error: ...` line and the exit code (2 bad input, 130 interrupted, 143 SIGTERM)

    with session(device, step_timeout) as s:    # a training run
        ... s.tick(epoch, step) ...             # stop requests and the stall watchdog, every rank at one step

Who this process is (`whoami`), the exit codes, joining the job under a deadline and the tie to the launcher
are its runtime module's; signals are installed only here (its interrupt module); the stall watchdog is its
watchdog module; `python3 -m isbi_unet.launch` is OneFlow's launcher with Ctrl-C passed on.
"""

from isbi_unet.process.interrupt import (
    guard_start_up,
    keyboard_interrupts,
    run_main,
    session,
    signals_held,
    start_up,
    worker_signals,
)
from isbi_unet.process.runtime import BadInput, Interrupted, Terminated, whoami

__all__ = [
    "BadInput",
    "Interrupted",
    "Terminated",
    "guard_start_up",
    "keyboard_interrupts",
    "run_main",
    "session",
    "signals_held",
    "start_up",
    "whoami",
    "worker_signals",
]
