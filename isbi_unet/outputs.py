"""Every output has one owner: a script removes or replaces only what it wrote, known by its content.

A folder output (predictions, overlays, get_data.py's slices) is written under `claim`:

    with claim(folder, "--flag", RECORD, overwrite=args.overwrite, inputs=[(path, "--input"), ...]) as out:
        ...                                  # read and check every input
        out.start(writes=[...], **fields)    # the earlier output goes; the record is written, unfinished
        ...                                  # write the files named in `writes` (or out.path(NAME) for others)
    # a clean exit marks the record finished, listing each file with its size and SHA-256

The folder is locked first (an OS lock on its own directory, held until the run ends and released by the
kernel if the process dies): a second process writing there is refused, naming the first. Then, under the
lock, the folder is surveyed. A file its record lists whose content still matches (size and digest) is this
script's earlier output, and so is what visualize.py drew from it (its overlay.json inside, with what that
lists); everything else, in sub-folders too, is the user's: a listed file changed since, an unlisted file,
a link, an empty folder of theirs. The user's files are never removed or written over: without --overwrite
a folder holding any is refused with one line naming them; with --overwrite the script writes beside them,
and a file it would write in the place of one of theirs is refused. A link inside the folder is never
written through, and sub-folders are checked against the inputs like the folder itself.

The record is written before the outputs, marked unfinished and listing what the run will write, and marked
finished after them: a run cut short leaves a folder that a rerun replaces (its unfinished files included,
and everything inside a folder output such as an OME-Zarr), or continues when the script finds it is the same
run; readers (evaluate.py, visualize.py) refuse it. Relative paths a record stores resolve against its
`cwd`, the directory the run was started in.

A single-file output (a plot, a figure, an ONNX file, a package) is new, or a file of the same kind that
this repo wrote (known by a mark inside it); anything else in its place is refused unless --overwrite.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import zipfile

from isbi_unet.errors import DataError, atomic_write, check_apart, check_output_dir, temporary_of
from isbi_unet.formats import KIND_KEY, OVERLAYS, PREDICTIONS
from isbi_unet.formats import ONNX_FORMAT as FORMAT

DRAWN_FROM = {PREDICTIONS: (OVERLAYS,)}  # records of outputs drawn from a record's own, found inside its folder


class FolderLock:
    """An exclusive flock(2) on a folder's own directory: nothing is added to the user's folder, and the
    kernel releases it when the process ends, however it ends. A folder made for the lock and still empty
    when it is released (the run was refused before writing) is removed."""

    def __init__(self, folder, fd, made):
        self.folder, self.fd, self.made = folder, fd, made

    def release(self):
        if self.fd is None:
            return
        if self.made:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # only if empty
        os.close(self.fd)
        self.fd = None


def lock_folder(folder, flag):
    """Locks folder `folder` (made if new) for this process, or raises DataError naming the process holding it."""
    check_output_dir(folder, flag)
    made = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DataError(f"{folder}: {flag} cannot be opened ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise DataError(
            f"{folder}: {flag} is being written by {holder}; wait for it to end, or choose another folder"
        ) from None
    if os.stat(fd).st_ino != os.stat(folder).st_ino:  # removed and made again while we waited to lock it
        os.close(fd)
        return lock_folder(folder, flag)
    return FolderLock(folder, fd, made)


def lock_holder(fd):
    """`process PID (COMMAND)` holding a flock on the file of `fd`, from /proc/locks; `another process` if unknown."""
    st = os.fstat(fd)
    here = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            rows = [line.split() for line in f if "->" not in line]
    except OSError:
        rows = []
    held = [r for r in rows if len(r) > 5 and r[1] == "FLOCK" and r[5] == here]
    held = held or [r for r in rows if len(r) > 5 and r[1] == "FLOCK" and r[5].split(":")[-1] == str(st.st_ino)]
    if not held:
        return "another process"
    pid = held[0][4]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = shlex.join(arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg)
    except OSError:
        return f"process {pid}"
    return f"process {pid} ({command[:200]})"


def file_digest(path):
    """{"size": bytes, "sha256": hex} of file `path`, read in blocks (checkpoints are large)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def still_written(path, entry):
    """Whether file `path` holds what `entry` (file_digest's dict) says was written there."""
    try:
        return (
            isinstance(entry, dict)
            and os.path.getsize(path) == entry.get("size")
            and file_digest(path)["sha256"] == entry.get("sha256")
        )
    except OSError:
        return False


def load_record(folder, record):
    """The JSON object in file `record` of `folder`, or None (none there, unreadable, not an object)."""
    try:
        with open(os.path.join(folder, record)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_record(folder, record):
    """The folder's record as a dict, or None when there is none (or it is not one of ours)."""
    data = load_record(folder, record)
    ours = data is not None and isinstance(data.get("outputs"), list) and isinstance(data.get("files"), dict)
    return data if ours else None


def earlier_version(folder, record):
    """Whether `record` in `folder` is one this repo wrote before records listed digests (names only)."""
    data = load_record(folder, record)
    return data is not None and isinstance(data.get("outputs"), list) and "files" not in data


def within(rel):
    """`rel` normalised, or None when it leaves the folder (an absolute path or `..`: a forged record)."""
    rel = os.path.normpath(rel)
    return None if os.path.isabs(rel) or rel == ".." or rel.startswith("../") or rel == "." else rel


def listed_files(folder, record):
    """{relative path: (digest entry or None, unfinished)} that records in `folder` list: its own record's, and
    those of outputs drawn from it in its sub-folders (each relative to its record's folder); records included."""
    listed = {}
    places = [("", record)]
    for sub, _, files in os.walk(folder):
        for nested in DRAWN_FROM.get(record, ()):
            if nested in files and sub != folder:
                places.append((os.path.relpath(sub, folder), nested))
    for sub, name in places:
        data = read_record(os.path.join(folder, sub), name)
        if data is None:
            continue
        unfinished = data.get("finished") is False
        listed[os.path.normpath(os.path.join(sub, name))] = ("record", unfinished)
        for rel, entry in data["files"].items():
            rel = within(os.path.join(sub, str(rel)))
            if rel is not None:
                listed[rel] = (entry, unfinished)
    return listed


def survey(folder, record):
    """(earlier, users, dirs, changed): the relative paths in `folder` of this script's earlier output whose
    content is as written, those of everything else (the user's; sub-folders included), the sub-folders of the
    earlier output (deepest first), and which of the user's files a record lists (changed since written)."""
    listed = listed_files(folder, record)
    earlier, users, dirs = [], [], []
    for sub, subdirs, files in os.walk(folder):
        for name in list(subdirs):
            if os.path.islink(os.path.join(sub, name)):  # a link to a folder: walked past, never through
                subdirs.remove(name)
                files.append(name)
        rel_sub = os.path.relpath(sub, folder)
        for name in files:
            rel = os.path.normpath(os.path.join(rel_sub, name))
            (earlier if is_earlier(os.path.join(sub, name), rel, listed) else users).append(rel)
        if rel_sub != ".":
            has_listed = any(p.startswith(rel_sub + "/") for p in listed)
            if has_listed:
                dirs.append(rel_sub)
            elif not subdirs and not files:
                users.append(rel_sub)  # an empty folder of the user's
    changed = {rel for rel in users if rel in listed}
    return sorted(earlier), sorted(users), sorted(dirs, key=lambda d: -d.count("/")), changed


def is_earlier(path, rel, listed):
    if os.path.islink(path):
        return False  # a script writes no links
    if being_written_under(rel, listed):  # inside a folder output (an OME-Zarr) a stopped run was writing
        return True
    if rel not in listed:
        target = temporary_of(os.path.basename(rel))  # left by a run killed while writing that file
        rel = os.path.join(os.path.dirname(rel), target) if target else None
        return rel in listed and listed[rel][1]
    entry, unfinished = listed[rel]
    if entry == "record":
        return True
    return (entry is None and unfinished) or still_written(path, entry)  # None: a stopped run was writing it


def being_written_under(rel, listed):
    """Whether a folder that `rel` lies in is an output an unfinished record lists as being written."""
    parts = rel.split("/")
    return any(listed.get("/".join(parts[:i])) == (None, True) for i in range(1, len(parts)))


def describe(names, changed, limit=3):
    """`a, b (changed since written), c and N more`, for refusals."""
    shown = [name + (" (changed since written)" if name in changed else "") for name in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def not_a_folder(folder, rel):
    """Whether `rel` in `folder` is no real folder (a file, or a link: never written through); an empty folder
    of the user's may be written into, which loses nothing."""
    path = os.path.join(folder, rel)
    return os.path.islink(path) or not os.path.isdir(path)


class Output:
    """A claimed folder: `start` replaces the earlier output, `path` registers a file to write, `finish` records
    every file written with its size and digest. Made by `claim`, which holds the folder's lock around it."""

    def __init__(self, folder, flag, record, overwrite):
        self.folder, self.flag, self.record, self.overwrite = folder, flag, record, overwrite
        self.files, self.fields, self.started, self.finished = {}, {}, False, False

    def users(self, under=("",)):
        """The user's files and folders in the output (relative paths), or only those under the `under` parts."""
        users = survey(self.folder, self.record)[1]
        return [u for u in users if any(not part or u == part or u.startswith(part + "/") for part in under)]

    def check(self):
        _, users, _, changed = survey(self.folder, self.record)
        if users and not self.overwrite and earlier_version(self.folder, self.record):
            raise DataError(
                f"{self.folder}: {self.flag} holds the output of an earlier version of this script, whose "
                f"{self.record} lists no digests to tell its files from yours; move it away, or choose a new folder"
            )
        if users and not self.overwrite:
            raise DataError(
                f"{self.folder}: {self.flag} holds files this script did not write ({describe(users, changed)}); "
                "choose a new or empty folder, or pass --overwrite to write beside them (they are kept)"
            )

    def earlier_record(self):
        """The record of this script's earlier output in the folder (a dict), or None."""
        return read_record(self.folder, self.record)

    def start(self, writes=(), keep_stopped=False, **fields):
        """Before the first file is written: refuses to write in the place of a file of the user's, removes the
        earlier output, and writes the record (unfinished) listing `writes` (relative paths) as being written.
        With `keep_stopped` (the caller continues a stopped run it has checked is the same), the files the
        stopped run was writing stay, to be written on."""
        earlier, users, dirs, changed = survey(self.folder, self.record)
        if keep_stopped:
            stopped = listed_files(self.folder, self.record)
            keep = {rel for rel in earlier if stopped.get(rel) == (None, True) or being_written_under(rel, stopped)}
            earlier, dirs = [rel for rel in earlier if rel not in keep], []
        for rel in [self.record, *writes]:
            rel = self.relative(rel)
            taken = [
                u
                for u in users
                if u == rel or u.startswith(rel + "/") or rel.startswith(u + "/") and not_a_folder(self.folder, u)
            ]
            if taken:
                whose = "was changed since it was written" if taken[0] in changed else "was not written by this script"
                raise DataError(
                    f"{os.path.join(self.folder, taken[0])}: {self.flag} holds this, which {whose}, where this "
                    f"script writes {rel}; move it away, or choose another folder"
                )
        remove(self.folder, [rel for rel in earlier if rel != self.record])
        for rel in dirs:  # the earlier output's sub-folders, once empty
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.folder, rel))
        self.fields, self.started = fields, True
        for rel in writes:
            self.files[self.relative(rel)] = None
        self.write_record(finished=False)

    def relative(self, rel):
        inside = within(rel)
        if inside is None:
            raise ValueError(f"{rel}: not a path inside {self.folder}")
        return inside

    def path(self, rel):
        """The path to write `rel` (relative to the folder) at, its folders made; registered in the record."""
        rel = self.relative(rel)
        full = self.make_parents(rel)
        if rel not in self.files:
            if os.path.lexists(full):
                raise DataError(f"{full}: {self.flag} holds this file of someone else's; move it away")
            self.files[rel] = None
            self.write_record(finished=False)
        return full

    def make_parents(self, rel):
        """Makes the folders `rel` lies in, refusing to pass through a link (one the script did not make)."""
        parent = self.folder
        for part in rel.split("/")[:-1]:
            parent = os.path.join(parent, part)
            if os.path.islink(parent) or (os.path.lexists(parent) and not os.path.isdir(parent)):
                raise DataError(f"{parent}: {self.flag} holds a link or file there, where this script writes a folder")
            if not os.path.isdir(parent):
                os.mkdir(parent)
        return os.path.join(self.folder, rel)

    def add_beside(self, path):
        """Records file `path`, written outside the folder (visualize.py's figure beside its overlays), with its
        digest: a run whose folder holds both knows it as drawn from its output (DRAWN_FROM)."""
        self.files[os.path.relpath(path, self.folder)] = file_digest(path)

    def finish(self, **fields):
        """Every registered file's size and digest (a file not written is dropped), and the record finished."""
        self.fields.update(fields)
        for rel in [rel for rel, entry in self.files.items() if entry is None]:
            path = os.path.join(self.folder, rel)
            del self.files[rel]
            if os.path.isfile(path) and not os.path.islink(path):
                self.files[rel] = file_digest(path)
            elif os.path.isdir(path) and not os.path.islink(path):  # a folder output (an OME-Zarr): each file
                for sub, _, names in os.walk(path):
                    for name in names:
                        full = os.path.join(sub, name)
                        self.files[os.path.relpath(full, self.folder)] = file_digest(full)
        self.write_record(finished=True)
        self.finished = True

    def write_record(self, finished):
        record = {
            **self.fields,
            "cwd": os.getcwd(),  # what relative paths in the record are relative to
            "finished": finished,
            "outputs": sorted(self.files),
            "files": dict(sorted(self.files.items())),
        }
        with atomic_write(os.path.join(self.folder, self.record)) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=str)
            f.write("\n")


@contextlib.contextmanager
def claim(folder, flag, record, overwrite=False, inputs=()):
    """`with claim(...) as out:` the folder output `folder` for the script whose record is `record`: locked for
    this process, checked apart from `inputs` ((path, flag) pairs) with its sub-folders, and refused if it holds
    files of the user's (unless `overwrite`). A clean exit after out.start() marks the output finished."""
    check_apart(folder, flag, inputs)
    lock = lock_folder(folder, flag)
    try:
        for sub, subdirs, files in os.walk(folder):  # a sub-folder or link to one is an output place too
            for name in subdirs + files:
                if os.path.isdir(os.path.join(sub, name)):
                    check_apart(os.path.join(sub, name), flag, inputs)
        out = Output(folder, flag, record, overwrite)
        out.check()
        yield out
        if out.started and not out.finished:
            out.finish()
    finally:
        lock.release()


def check_finished(folder, record, flag):
    """For readers of a folder output: refuses one whose run was cut short."""
    data = read_record(folder, record)
    if data is not None and data.get("finished") is False:
        raise DataError(f"{folder}: {flag} holds an unfinished run (it was stopped); run it again")


def remove(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


ONNX_MARK = FORMAT.encode()  # export_onnx.py's metadata, stored after the graph


def written_kind(path):
    """What this repo wrote at `path`, from a mark inside the file: a PNG's text chunk, an ONNX file's
    metadata, a package's ONNX weights. None for anything else (or an unreadable file)."""
    lower = path.lower()
    try:
        if lower.endswith(".png"):
            from PIL import Image  # comes with matplotlib; imported here, the only user

            with Image.open(path) as image:
                return image.text.get(KIND_KEY)
        if lower.endswith(".onnx"):
            with open(path, "rb") as f:
                return "ONNX export" if ends_marked(f) else None
        if lower.endswith(".zip"):
            with zipfile.ZipFile(path) as z, z.open("weights.onnx") as f:
                return "bioimage.io package" if "rdf.yaml" in z.namelist() and ends_marked(f) else None
    except Exception:  # not of its format, truncated, unreadable: in any case not ours
        return None
    return None


def ends_marked(f, tail=1 << 16):
    """Whether ONNX_MARK stands in the last `tail` bytes of the stream `f` (read through, for zip members)."""
    last = b""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        last = (last + chunk)[-tail:]
    return ONNX_MARK in last


def claim_file(path, flag, kind, overwrite=False):
    """Before any work: a file output `path` may replace only a file of the same `kind` that this repo wrote."""
    if not os.path.lexists(path) or overwrite:
        return
    if os.path.isdir(path):
        raise DataError(f"{path}: {flag} is a folder; name a file")
    if written_kind(path) != kind:
        raise DataError(
            f"{path}: {flag} exists and is not a {kind} written here; choose another name or pass --overwrite"
        )
