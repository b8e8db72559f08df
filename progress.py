"""The per-epoch progress bar of training: tqdm on stderr with the loss and images per second.

Shown on rank 0 only, and only when stderr is a terminal: in a log file or CI output a bar is a stream
of carriage returns, and the one summary line per epoch says the same.
"""
import sys

from tqdm import tqdm


def epoch_bar(epoch, epochs, images, enabled=True, world_size=1):
    """A bar over the `images` this rank trains on in `epoch`; under DDP it counts all ranks' images."""
    return tqdm(total=images, desc=f"epoch {epoch}/{epochs}", unit="img", leave=False, dynamic_ncols=True,
                unit_scale=world_size if world_size > 1 else False,
                disable=not (enabled and sys.stderr.isatty()), file=sys.stderr)
