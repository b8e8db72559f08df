"""Bad input, reported the same way by every script: one `error: PATH: problem` line and exit code 2.

Kept free of OneFlow so plot.py starts without it.
"""
import sys


class DataError(ValueError):
    """Bad input data, flags or checkpoints; the message names the path and what is wrong."""


def run_main(main):
    """Calls main(); a DataError becomes one line on stderr and exit code 2, with no traceback."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
