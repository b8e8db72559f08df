"""Bad input, reported the same way by every script: one `error: PATH: problem` line and exit code 2.

Under the launcher only rank 0 prints (every rank reads the same input and fails the same way); the other
ranks exit with the same code silently. `run_main` (isbi_unet.process) turns a DataError into that line; the
exit codes and the rank are the process plumbing's too.
"""

import contextlib
import os
import re
import sys
import tempfile

from isbi_unet.process.runtime import BadInput, whoami


class DataError(BadInput):
    """Bad input data, flags or checkpoints; the message names the path and what is wrong."""


class WriteError(DataError):
    """An output file could not be written (disk full, no permission); the message names it and the reason."""


def warn(message):
    """One `warning: ...` line on stderr; silent on ranks other than 0, which read the same files."""
    if whoami().rank > 0:
        return
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_output_dir(path, flag):
    """Fails early, creating nothing, when folder `path` could not be created or written.

    Run before any heavy work; the folder itself is made only once there is something to write.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"{path}: {flag} cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{path}: {flag} is not writable (no write permission on {existing})")


def make_output_dir(path, flag):
    """Creates folder `path` and proves it writable by making a file in it."""
    check_output_dir(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise DataError(f"{path}: {flag} cannot be written ({e.strerror})") from None


def inside(path, folder):
    """Whether `path` lies strictly inside `folder` (both resolved, so links and `..` do not hide it)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder and path != folder


def check_apart(output, flag, inputs):
    """The rule that keeps a user's data: an output that is, contains or lies inside an input is refused.

    inputs: (path, flag) pairs, None paths skipped. Checked before any work, so nothing is written.
    """
    for path, input_flag in inputs:
        if path is None:
            continue
        if os.path.realpath(output) == os.path.realpath(path):
            relation = "is"
        elif inside(output, path):
            relation = "lies inside"
        elif inside(path, output):
            relation = "contains"
        else:
            continue
        raise DataError(f"{output}: {flag} {relation} {input_flag} {path}; write outputs to a folder apart from inputs")


def cannot_write(path, error, what=""):
    """The WriteError for an OSError while writing `path`: `PATH: cannot write [WHAT ](REASON)`."""
    return WriteError(f"{path}: cannot write {what + ' ' if what else ''}({error.strerror or error})")


@contextlib.contextmanager
def atomic_write(path, what=""):
    """`with atomic_write(path) as tmp:` write `tmp`; it then replaces `path` in one rename.

    A failure (disk full, say) or a kill leaves `path` as it was; the temporary `.STEM.XXXXXXXX.tmp.EXT`
    beside it is removed, and an OSError becomes a WriteError naming `path`. The temporary file keeps the
    suffix, since writers such as OpenCV's pick the file format by it. It is created new, under a name of
    its own (O_EXCL, not following links): a link planted at a predictable name cannot send the bytes
    elsewhere, and the rename replaces a link at `path` rather than writing through it.
    """
    parent, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=parent or ".")
        os.close(fd)
    except OSError as e:
        raise cannot_write(path, e, what) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e, what) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


TEMPORARY = re.compile(r"^\.(?P<stem>.*)\.[a-z0-9_]{8}\.tmp(?P<ext>(\.[^.]*)?)$")  # atomic_write's names


def temporary_of(name):
    """The file name whose atomic_write temporary `name` is (`.0.k2x_a9mq.tmp.png` -> `0.png`), else None."""
    match = TEMPORARY.match(name)
    return match["stem"] + match["ext"] if match else None
